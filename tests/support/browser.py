"""A real browser for tests of the portal: Debian's headless Chromium, driven through
its chromedriver by Selenium; and the portal itself, run as `rolehost portal`.

Chromium's profile and temporary files go to a folder of its own (not /tmp/rolehost-*,
which the leak check watches), removed afterwards; chromedriver and every Chromium
process it started are gone when `chromium()` returns.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1280,1400"]


def require_chromium() -> None:
    """Skip without Chromium, chromedriver or Selenium; fail instead in CI, which must
    have them (.ci/run installs them)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        why = (f"the portal's browser test needs {', '.join(missing)}: "
               "apt-get install chromium chromium-driver; pip install selenium")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium WebDriver, every process of it gone afterwards."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    scratch = Path(tempfile.mkdtemp(prefix="portal-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={scratch / 'profile'}"]:
        options.add_argument(flag)
    env = {**os.environ, "TMPDIR": str(scratch)}  # Chromium's own temporary files
    service = Service(executable_path=str(CHROMEDRIVER), env=env)
    driver = webdriver.Chrome(service=service, options=options)
    process = service.process
    tree = _tree(process.pid if process is not None else None)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            tree += _tree(process.pid if process is not None else None)
            _, alive = psutil.wait_procs(tree, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
            shutil.rmtree(scratch, ignore_errors=True)


def _tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class Portal:
    url: str  # with the token, as printed
    host: str
    port: int
    token: str
    process: subprocess.Popen[str]

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def portal(*args: str, timeout: float = 30.0) -> Iterator[Portal]:
    """`rolehost portal ARGS --no-browser`, until its first line; stopped afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rolehost", "portal", *args, "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline() if process.stdout
                                                  else ""), daemon=True).start()
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"rolehost portal printed nothing in {timeout:g}s") from None
        assert first.startswith("portal: http://"), first + (process.stdout.read()
                                                             if process.poll() is not None
                                                             else "")
        url = first.split(" ", 1)[1].strip()
        address, _, token = url.removeprefix("http://").partition("/?token=")
        host, _, port = address.rpartition(":")
        yield Portal(url, host, int(port), token, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# Set to a folder (docs/ by `make docs`) to keep the screenshots the browser tests take.
SCREENSHOTS = "ROLEHOST_PORTAL_SCREENSHOTS"


def shot(driver: Any, name: str, element: Any = None) -> None:
    """Keep a screenshot of the page (or of `element`) as `name`, when asked to."""
    folder = os.environ.get(SCREENSHOTS)
    if folder:
        path = Path(folder) / name
        if element is None:
            driver.save_screenshot(str(path))
        else:
            element.screenshot(str(path))
        assert path.stat().st_size > 0


def output(driver: Any) -> str:
    """The portal's Progress box: what its actions printed."""
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, "output").text)


def press(driver: Any, selector: str) -> str:
    """Press a button that asks first, say yes, and return the question."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # The part that holds the button is replaced as it refreshes: found and clicked in
    # one go, by the page; later, since the question blocks the script that asks it.
    driver.execute_script(
        "const s = arguments[0]; setTimeout(() => document.querySelector(s).click(), 0);",
        selector)
    alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
    question = str(alert.text)
    alert.accept()
    return question
