"""The hello sample, rehearsed the way a user would test their own role."""

from pathlib import Path

from rolehost.testing import ServiceHarness, wait_until

HERE = Path(__file__).parent


def test_hello_works_survives_a_restart_and_stops_cleanly() -> None:
    with ServiceHarness(HERE / "rolehost.toml", env={"PYTHONUNBUFFERED": "1"}) as service:
        status = service.wait_ready(timeout=30)
        assert [i["update_domain"] for i in status["instances"]] == [0, 1]
        journal = Path(service.instance("worker/0")["resources"]["journal"]["path"]) / "journal.txt"
        wait_until(journal.exists, 10, "the first journal entry")
        before = journal.read_text().count("hello #")

        [row] = service.restart("worker/0")  # the journal is clean_on_recycle = false: it stays
        assert row["state"] == "ready"
        assert journal.read_text().count("hello #") >= before
        assert "worker_IN_0: stopping, finishing up" in service.logs("worker/0")

        service.stop()
        for index in (0, 1):
            assert f"worker_IN_{index}: stopped cleanly" in service.logs(f"worker/{index}")
