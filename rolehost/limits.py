"""Bounds of a definition that light readers need without the model: the command line's
argument types and instance-name parsing. `rolehost.definition` enforces them and
re-exports them; they live here because importing anything under `rolehost.definition`
imports the model (pydantic), about 0.3 s of every command's start (issue 23: `rolehost
status` at 500 instances)."""

from __future__ import annotations

# How many instances a role may have: the platform's own bound per role.
MIN_INSTANCES, MAX_INSTANCES = 1, 1000
# A service, role, endpoint or resource name (the model adds its length).
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"
