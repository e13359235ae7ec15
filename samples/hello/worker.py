"""A worker role: greets on a timer, keeps a journal on local storage, stops cleanly."""

from datetime import UTC, datetime

from rolehost import RoleEntryPoint, RoleEnvironment


class HelloWorker(RoleEntryPoint):
    def on_start(self) -> bool:
        me = RoleEnvironment.current_instance
        self.greeting = RoleEnvironment.get_setting("greeting")
        self.interval = float(RoleEnvironment.get_setting("interval"))
        self.journal = RoleEnvironment.local_resource("journal").path / "journal.txt"
        RoleEnvironment.on_stopping(lambda: print(f"{me.id}: stopping, finishing up"))
        print(f"{me.id}: starting in update domain {me.update_domain}")
        return True

    def run(self) -> None:
        me = RoleEnvironment.current_instance
        beat = 0
        # wait_for_stop doubles as the timer: it returns True as soon as a stop begins.
        while not RoleEnvironment.wait_for_stop(self.interval):
            beat += 1
            line = f"{datetime.now(UTC).isoformat(timespec='seconds')} {self.greeting} #{beat}"
            with self.journal.open("a") as journal:
                journal.write(f"{me.id} {line}\n")
            print(f"{me.id}: {line}")

    def on_stop(self) -> None:
        print(f"{RoleEnvironment.current_instance.id}: stopped cleanly")
