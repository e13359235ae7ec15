"""Rehearse a service from your own tests: a real controller, real processes.

    from rolehost.testing import ServiceHarness

    def test_worker_survives_a_crash():
        with ServiceHarness("rolehost.toml") as service:
            service.wait_ready(timeout=30)
            pid = service.kill("worker/0")
            service.wait_replaced("worker/0", pid, timeout=30)
            assert service.instance("worker/0")["restarts"] == 1

The harness starts `rolehost start` on a private run directory, talks to it over the
control API, and on exit stops it and checks that no process of it is left.
"""

from rolehost.testing.harness import ServiceHarness, run_dir_processes
from rolehost.testing.load import LoadProbe
from rolehost.testing.rolerun import RoleRun, run_role
from rolehost.testing.waiting import POLL, HarnessError, wait_until

__all__ = ["POLL", "HarnessError", "LoadProbe", "RoleRun", "ServiceHarness", "run_dir_processes",
           "run_role", "wait_until"]

# Public names print as users import them (`rolehost.testing.HarnessError` in a failed
# test's report), whichever module of the package holds them.
for _public in (ServiceHarness, LoadProbe, RoleRun, HarnessError, run_dir_processes, run_role,
                wait_until):
    _public.__module__ = __name__
