"""The portal's idle cost: CPU of the controller and of `rolehost portal` while nothing
happens, with no portal, with the portal and no page, and with one page open.

    python bench/portal.py [--seconds 30] [--json out.json]

Runs samples/web (3 instances behind the balancer, no traffic) under a controller, then
`rolehost portal`, then opens the service page in headless Chromium (Debian's
`chromium` and `chromium-driver`, as tests/test_portal.py does). In each phase it
samples the CPU time of the controller process and of the portal process over the same
wall time. The page refreshes its instances and its walk once a second each: what an
open page costs is those two requests, and the status each asks the controller for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser and the portal as the tests run them

from rolehost.testing import ServiceHarness  # noqa: E402
from support.browser import chromium, portal  # noqa: E402
from support.net import free_port  # noqa: E402


def cpu(processes: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    """Each process's CPU over `seconds` of wall time, in % of one core."""
    def used(p: psutil.Process) -> float:
        times = p.cpu_times()
        return float(times.user + times.system)

    before = {name: used(p) for name, p in processes.items()}
    began = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - began
    return {name: round(100 * (used(p) - before[name]) / wall, 2)
            for name, p in processes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="portal-bench-"))
    try:
        shutil.copytree(ROOT / "samples" / "web", work / "web")
        toml = work / "web" / "rolehost.toml"
        toml.write_text(toml.read_text().replace("port = 8080", f"port = {free_port()}"))
        results: dict[str, Any] = {"seconds": args.seconds}
        with ServiceHarness(toml) as h:
            h.wait_ready(60)
            controller = psutil.Process(h.status()["pid"])
            time.sleep(3)  # past the start's own work
            results["no portal"] = cpu({"controller": controller}, args.seconds)
            with portal("-f", str(toml), "--run-dir", str(h.run_dir.path),
                        "--listen", f"127.0.0.1:{free_port()}") as p:
                watched = {"controller": controller, "portal": psutil.Process(p.process.pid)}
                results["portal, no page"] = cpu(watched, args.seconds)
                with chromium() as driver:
                    driver.get(p.url)
                    time.sleep(3)
                    results["portal, one page open"] = cpu(watched, args.seconds)
        print(f"idle CPU, % of one core, over {args.seconds:g}s each (3 instances, no traffic)")
        print(f"{'phase':<24} {'controller':>10} {'portal':>8}")
        for phase in ("no portal", "portal, no page", "portal, one page open"):
            row = results[phase]
            print(f"{phase:<24} {row['controller']:>10.2f} "
                  f"{row.get('portal', float('nan')):>8.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
