"""Watching the definition file: the controller applies an edit once it is saved."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


class _Watcher:
    def __init__(self, observer: Any) -> None:
        self.observer = observer

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(5)


def watch_file(
    path: Path, loop: asyncio.AbstractEventLoop, changed: Any, settle: float = 0.3
) -> _Watcher:
    """Call `changed()` on the loop once `path` has been written and left alone for
    `settle` seconds (editors save in several steps). Woken by file events (watchdog)."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    target, pending = str(path), list[asyncio.TimerHandle]()

    def fire() -> None:
        pending.clear()
        changed()

    def on_loop() -> None:
        for handle in pending:
            handle.cancel()
        pending[:] = [loop.call_later(settle, fire)]

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("modified", "created", "moved", "closed") and target in (
                event.src_path, getattr(event, "dest_path", "")
            ):
                loop.call_soon_threadsafe(on_loop)

    observer = Observer()
    observer.schedule(Handler(), str(path.parent), recursive=False)
    observer.start()
    return _Watcher(observer)
