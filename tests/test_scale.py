"""Scaling a role while the service runs: what the new instances are, and what they see."""

from __future__ import annotations

from pathlib import Path

from conftest import MakeService

from rolehost.testing import wait_until

# Each start says whether the local resource still holds what an earlier instance wrote.
DISKS = """
class Role(RoleEntryPoint):
    def on_start(self):
        kept = RoleEnvironment.local_resource("cache").path / "kept"
        probe(f"start kept={kept.exists()}")
        kept.write_text("x")
        return True
"""

# An image task: it runs again only on a new image (its marker lives in os/).
TASK = """
[roles.web.local_resources.cache]
size_mb = 10
clean_on_recycle = false

[[roles.web.startup_tasks]]
command = "echo $ROLEHOST_INSTANCE_ID >> {tasks}"
shell = true
once_per = "image"
"""


def test_an_instance_scaled_out_again_is_a_new_vm(make_service: MakeService,
                                                   tmp_path: Path) -> None:
    """On the platform a scale-in deletes the VM and a scale-out creates a new one: the
    index that comes back has none of the old instance's disks or task markers."""
    tasks = tmp_path / "tasks.txt"
    service = make_service(DISKS, instances=3, extra=TASK.format(tasks=tasks))
    with service.harness(run_dir=tmp_path / "run") as h:
        h.wait_ready(30)
        folder = h.run_dir.path / "instances" / "web_IN_2"
        assert folder.is_dir()
        h.scale("web", 2)
        assert not folder.exists()
        h.scale("web", 3)
        h.wait_ready(30)
        service.wait_probe("start kept=False web_IN_2")
        assert service.probes().count("start kept=False web_IN_2") == 2
        assert "start kept=True web_IN_2" not in service.probes()
        assert tasks.read_text().split().count("web_IN_2") == 2
    # A controller stopped with 3 instances and started with 2 leaves web_IN_2's folders
    # behind: a scale-out does not take them over.
    service.toml.write_text(service.toml.read_text().replace("instances = 3", "instances = 2"))
    with service.harness(run_dir=h.run_dir.path) as again:
        again.wait_ready(30)
        assert folder.is_dir()
        again.scale("web", 3)
        again.wait_ready(30)
        wait_until(lambda: service.probes().count("start kept=False web_IN_2") == 3, 30,
                   "a third fresh start of web_IN_2", lambda: "\n".join(service.probes()))
        assert tasks.read_text().split().count("web_IN_2") == 3
        assert "start kept=True web_IN_0" in service.probes()  # a controller start keeps them


TOPOLOGY = """
from rolehost import TopologyChange

class Role(RoleEntryPoint):
    def on_start(self):
        RoleEnvironment.on_changing(self.changing)
        RoleEnvironment.on_changed(self.changed)
        probe(f"start roles={','.join(RoleEnvironment.roles['web'])}")
        return True

    def changing(self, event):
        probe("changing " + ",".join(c.role for c in event.changes
                                      if isinstance(c, TopologyChange)))

    def changed(self, changes):
        probe(f"changed roles={','.join(RoleEnvironment.roles['web'])}")
"""


def test_every_instance_of_a_scale_out_by_several_sees_all_of_them(
    make_service: MakeService,
) -> None:
    """The new instances see each other, the ones added after them too, as the ones
    that were there are told."""
    service = make_service(TOPOLOGY, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        h.scale("web", 5)
        h.wait_ready(30)
        every = ",".join(f"web_IN_{i}" for i in range(5))
        for i in (0, 1):
            service.wait_probe(f"changing web web_IN_{i}")
            service.wait_probe(f"changed roles={every} web_IN_{i}")
        starts = [line for line in service.probes() if line.startswith("start")]
        assert sorted(starts[2:]) == [f"start roles={every} web_IN_{i}" for i in (2, 3, 4)]
