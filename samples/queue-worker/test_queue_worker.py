"""No message lost, none processed twice: through a restart, a reimage, kill -9, a deploy."""

import signal
import sys
from pathlib import Path

from rolehost.testing import ServiceHarness, wait_until

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import durable_queue  # noqa: E402


def test_no_message_is_lost_or_processed_twice(tmp_path: Path) -> None:
    definition = tmp_path / "rolehost.toml"
    definition.write_text(
        (HERE / "rolehost.toml").read_text()
        .replace('entry_point = "worker:QueueWorker"',
                 f'entry_point = "worker:QueueWorker"\napp = "{HERE}"')
    )

    def done() -> int:
        return durable_queue.counts(db)["done"]

    with ServiceHarness(definition) as service:
        service.wait_ready(timeout=60)
        # The sample's default queue: this run directory's own (the workers wait on it).
        db = durable_queue.connect(service.run_dir.path / "queue.db")
        durable_queue.enqueue(db, [f"message {n}" for n in range(600)])
        wait_until(lambda: done() >= 50, 30, "work under way")
        service.restart("worker/0")
        service.reimage("worker/1")
        wait_until(lambda: done() >= 250, 60, "more work")
        for name in ("worker/0", "worker/1"):  # kill -9 in the middle of a message
            service.wait_replaced(name, service.kill(name, signal.SIGKILL), 30)
        service.package("v2")
        assert service.deploy("v2")["state"] == "succeeded"
        wait_until(lambda: done() == 600, 120, "every message done")
        counts = durable_queue.counts(db)
        assert counts == {"ready": 0, "processing": 0, "done": 600,
                          "effects": 600, "distinct": 600}, counts
        returned = service.logs("worker/0") + service.logs("worker/1")
        assert "message(s) handed back" in returned
