"""An instance's CPU load: `status` reuses the heartbeats' recent sample instead of
reading every host's stat file again (N reads per status at N instances)."""

from __future__ import annotations

import os
import time

from rolehost.fabric.usage import CpuLoad


def test_a_fresh_sample_is_reused_and_a_stale_one_is_not() -> None:
    load = CpuLoad()
    assert load.sample(os.getpid()) is None  # one sample: no load yet
    began = time.process_time()
    while time.process_time() - began < 0.3:  # some CPU, over more than 0.2 s of wall time
        pass
    first = load.sample(os.getpid())
    assert first is not None and first > 0
    taken = len(load._samples)
    assert load.sample(os.getpid(), fresh_for=60) == first  # reused: no new reading
    assert len(load._samples) == taken
    load.sample(os.getpid())  # asked without fresh_for (a heartbeat): a new reading
    assert len(load._samples) == taken + 1
    assert load.sample(None) is None and len(load._samples) == 0
