"""rolehost: the lifecycle of Azure Cloud Services roles, for Python, on your own machine."""

from rolehost.entrypoint import RoleEntryPoint
from rolehost.environment import (
    Changing,
    InstanceEndpoint,
    LocalResource,
    Role,
    RoleEnvironment,
    RoleEnvironmentError,
    RoleInstance,
    RoleStatus,
    SettingChange,
    SettingNotFound,
    StatusCheck,
    TopologyChange,
)

__all__ = [
    "Changing",
    "InstanceEndpoint",
    "LocalResource",
    "Role",
    "RoleEntryPoint",
    "RoleEnvironment",
    "RoleEnvironmentError",
    "RoleInstance",
    "RoleStatus",
    "SettingChange",
    "SettingNotFound",
    "StatusCheck",
    "TopologyChange",
]
