"""A role that needs a tool installed in os/ and its name registered in the machine's config."""

import subprocess

from rolehost import RoleEntryPoint, RoleEnvironment


class ToolRole(RoleEntryPoint):
    def on_start(self) -> bool:
        tool = RoleEnvironment.os_dir / "tools" / "greet"
        if not tool.exists():
            raise RuntimeError(f"{tool} is missing: the install task did not run")
        config = (RoleEnvironment.os_dir / "machine.conf").read_text()
        me = RoleEnvironment.current_instance.id
        if f"instance={me}" not in config:
            raise RuntimeError(f"{me} is not registered in machine.conf")
        self.tool = tool
        return True

    def run(self) -> None:
        while not RoleEnvironment.wait_for_stop(5):
            subprocess.run([self.tool, RoleEnvironment.current_instance.id], check=True)
