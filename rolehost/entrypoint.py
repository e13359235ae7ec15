"""`RoleEntryPoint`: the class a user subclasses to describe one role."""

from __future__ import annotations

from rolehost.environment import RoleEnvironment


class RoleEntryPoint:
    """Subclass and override any of the three lifecycle methods; each may be `async def`.

    - `on_start()` warms the instance up. Return False (or raise) to have it recycled.
    - `run()` is the instance's main loop. Returning from it recycles the instance
      gracefully; raising recycles it without `stopping` or `on_stop`. When a stop is
      requested, an async `run` is cancelled; a sync `run` keeps running until on_stop
      returns and the process ends, as on the platform.
    - `on_stop()` is called once on a graceful stop, after the `stopping` handlers,
      within the role's `stop_timeout`.
    """

    def on_start(self) -> bool:
        return True

    def run(self) -> None:
        RoleEnvironment.wait_for_stop()

    def on_stop(self) -> None:
        return None
