"""The launcher: what each driver of instances does around them, in one order.

Three drivers run instances: the controller (`rolehost start`), single-instance mode
(`rolehost run-instance`) and `rolehost check`'s rehearsal. The launcher does what they
share; each keeps what is its own (the controller's API, balancers and operations, the
single instance's health port and drain, the rehearsal's scratch folder and steps).

The order, from the start to the end of a driver's run:

1. prepare the deployment (the constructor): who limited work runs as, and the standby
   host. This comes before the orphan reaper is on: the privileges check waits for a
   child of its own (privileges.check);
2. claim the run directory: its lock, its logs, no process an earlier holder left;
3. supervise: adopt the orphans of the instances' processes, and take SIGTERM and
   SIGINT: the first asks for a graceful stop, a second cuts it short;
4. start: the standby host warmed, then the instances;
5. stop: the instances, then the stop signals given up, then the standby host;
6. close the instances' output logs, flushing a line a host left unfinished: the last
   of all, once the driver has closed what it serves (the API and the balancers, the
   health port).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import structlog

from rolehost.definition import Service
from rolehost.fabric.deployment import Deployment
from rolehost.fabric.instance import Instance
from rolehost.fabric.rundir import AlreadyRunning, RunDir
from rolehost.observability import logs
from rolehost.processes import ownership, process

log = structlog.get_logger()


class Launcher:
    """One driver's deployment, from its preparation to the end of its teardown."""

    def __init__(self, service: Service, run_dir: Path, console: logs.Console | None,
                 observer: Callable[[Instance], None] | None = None) -> None:
        """Prepare the deployment: privileges.Unusable if the service's limited_user
        cannot run its hosts."""
        self.deployment = Deployment.prepare(service, run_dir, console, observer)
        # Every instance given to `stop` has stopped: a signal has nothing left to stop.
        self.stopped = False
        self.lock = -1  # the run directory's lock (`claim`): held until this process ends
        # Claimed a run directory: this process runs the service, and owns every child it
        # has (a rehearsal runs in the CLI's process, and claims none).
        self.claimed = False
        self._signals = 0
        self._on_stop: Callable[[str], None] | None = None
        self._on_force: Callable[[str], None] | None = None

    async def claim(self, run_dir: RunDir) -> None:
        """Take `run_dir` for this process (AlreadyRunning if another has it), log there,
        and stop the processes an earlier holder left there (it was killed before it
        could stop them)."""
        # Never closed: the kernel drops the lock when this process is gone, so `rolehost
        # stop` (which waits for it) returns only once nothing of the controller is left.
        self.lock = run_dir.lock()
        logs.configure(run_dir.logs, self.deployment.console)
        try:
            swept = await asyncio.to_thread(process.sweep_leftovers, run_dir.path)
        except ownership.OwnerAlive as alive:
            # Its run directory was deleted or replaced under it: the lock proved nothing.
            raise AlreadyRunning(
                f"another controller (pid {alive.pid}) is already running on {run_dir.path} "
                f"(its hosts, pids {', '.join(map(str, alive.processes))}, name it), though "
                "its run directory was deleted or replaced: nothing was touched. It makes "
                "its run directory again within seconds; manage it with `rolehost status` "
                "and `rolehost stop`") from None
        if swept:
            log.warning("leftovers_swept", count=len(swept), processes=swept)
        self.claimed = True
        cgroups = self.deployment.cgroups
        if cgroups is not None and await asyncio.to_thread(cgroups.open):
            if dead := await asyncio.to_thread(cgroups.sweep_dead):
                log.warning("leftover_cgroups_swept", cgroups=dead)
        elif cgroups is not None:
            log.info("cgroups_unavailable", reason=cgroups.reason,
                     detail="a detached daemon of a role is ended at the controller's stop")

    def supervise(self, on_stop: Callable[[str], None] | None = None,
                  on_force: Callable[[str], None] | None = None) -> bool:
        """Reap the orphans of the instances' processes. With `on_stop`, take SIGTERM and
        SIGINT until `stop` ends: the first is a graceful stop (`on_stop` is given the
        signal's name), the second cuts it short (`on_force`), and later ones are ignored.
        False if this process could not become the orphans' subreaper: a detached
        grandchild may then escape."""
        loop = asyncio.get_running_loop()
        adopted = process.adopt_orphans(loop)
        if on_stop is not None:
            self._on_stop, self._on_force = on_stop, on_force
            process.handle_stop_signals(loop, self._signal)
        return adopted

    def _signal(self, signum: int) -> None:
        # A signal that came just before `stop` gave the signals up is run just after:
        # it finds nothing left to stop, and must not make the exit that of a forced stop.
        if self.stopped:
            return
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1 and self._on_stop is not None:
            self._on_stop(name)
        elif self._signals == 2 and self._on_force is not None:
            self._on_force(name)
        # Forced already, a third signal has nothing left to cut short. A stream of them
        # (a held Ctrl-C, a script) would else log and loop the instances at every one,
        # and starve the very exits the forced stop waits for.

    def start(self, instances: Iterable[Instance]) -> None:
        """Warm the standby host, then start `instances`: the first boot takes that host."""
        self.deployment.standby.warm()
        for instance in instances:
            instance.start()

    async def stop(self, instances: Collection[Instance], reason: str) -> None:
        """Stop `instances` gracefully, all at once; then give up the stop signals, as the
        last one stops; then close the standby host, which no boot will take now."""
        left = len(instances)

        async def stop(instance: Instance) -> None:
            nonlocal left
            try:
                await instance.stop(reason)
            finally:
                left -= 1
                if not left:
                    # In the turn of the loop that the last stop ends in: a signal that
                    # arrives after is ignored, not taken for a second one to force with.
                    self._stopped()

        await asyncio.gather(*(stop(i) for i in instances))
        self._stopped()  # `instances` was empty
        await self.deployment.standby.close()
        if self.claimed:
            await asyncio.to_thread(self._end_strays)

    def _end_strays(self) -> None:
        """End what the instances' teardowns could not tie to an instance: processes
        re-parented to this one that it did not start, then the cgroups."""
        if strays := process.sweep_strays():
            log.warning("strays_swept", count=len(strays), processes=strays)
        if self.deployment.cgroups is not None:
            self.deployment.cgroups.close()

    def _stopped(self) -> None:
        if not self.stopped:
            self.stopped = True
            if self._on_stop is not None:
                process.ignore_stop_signals()

    @staticmethod
    def close(instances: Iterable[Instance]) -> None:
        """Close the instances' output logs: the last step of a driver's teardown."""
        for instance in instances:
            instance.output.close()
