"""A queue worker that loses no message and does none twice, whatever stops it."""

import os
import time
from pathlib import Path

import durable_queue

from rolehost import RoleEntryPoint, RoleEnvironment


def queue_path() -> Path:
    """The `queue` setting, or `queue.db` in the run directory: this run's own file, which
    both instances reach (a local resource would be one instance's). A fixed path such as
    /tmp/queue.db would be shared by every user and every run on the machine."""
    configured = RoleEnvironment.get_setting("queue")
    return Path(configured or Path(os.environ["ROLEHOST_RUN_DIR"], "queue.db"))


class QueueWorker(RoleEntryPoint):
    def on_start(self) -> bool:
        self.me = RoleEnvironment.current_instance.id
        self.db = durable_queue.connect(queue_path())
        self.work_seconds = float(RoleEnvironment.get_setting("work_seconds"))
        # A previous incarnation of this instance may have been killed holding a message:
        # it left no effect (that commits with the done mark), so it can go out again.
        returned = durable_queue.release(self.db, self.me)
        print(f"{self.me}: started, {returned} message(s) returned from before")
        return True

    def run(self) -> None:
        while not RoleEnvironment.is_stopping:
            message = durable_queue.claim(self.db, self.me)
            if message is None:
                RoleEnvironment.wait_for_stop(0.05)
                continue
            time.sleep(self.work_seconds)  # the work itself
            if RoleEnvironment.is_stopping:
                break  # on_stop hands it back: finishing might outlast the stop
            durable_queue.complete(self.db, message[0], self.me)

    def on_stop(self) -> None:
        # on_stop runs on another thread than run(): a connection of its own.
        db = durable_queue.connect(queue_path())
        returned = durable_queue.release(db, self.me)
        db.close()
        print(f"{self.me}: stopping, {returned} message(s) handed back")
