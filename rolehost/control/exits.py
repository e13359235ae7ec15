"""The exit codes of the `rolehost` command (docs/concepts.md#exit-codes).

0 done; 1 the operation failed; 2 the definition or the usage is wrong, or a deploy's
preflight refused it: nothing was touched; 3 the service stopped, but not gracefully (a
stop whose cleanup may be incomplete, which a supervisor must not take for a failure to
start). `start`, `stop` and `run-instance` exit 3 alike: one constant for all three.
"""

from __future__ import annotations

EXIT_FAILED, EXIT_BAD_DEFINITION, EXIT_STOP_CUT_SHORT = 1, 2, 3

# What each `kind` of the API's errors exits with (api.ANSWERS gives each error its
# kind), and not each status: a 409 is a conflict or a preflight refusal. 2 when what
# was asked for is wrong and nothing was touched, which running it again will not
# change; 1 for the rest, and for a kind this CLI does not know (a newer controller's,
# or none: an older one's).
EXIT_CODES = {
    "invalid": EXIT_BAD_DEFINITION,  # a bad name or argument
    "not-found": EXIT_BAD_DEFINITION,  # no such instance, role, package or route
    "does-not-load": EXIT_BAD_DEFINITION,  # a package's definition or entry point
    # Whatever its reason (an incompatible package is a conflict): a script tells "nothing
    # was touched" from a walk that failed.
    "preflight": EXIT_BAD_DEFINITION,
    "not-allowed": EXIT_FAILED,
    "conflict": EXIT_FAILED,  # another operation is under way: it can be run again
    "too-large": EXIT_FAILED,
    "failed": EXIT_FAILED,
    "unavailable": EXIT_FAILED,
    "internal": EXIT_FAILED,
}


def for_kind(kind: str | None) -> int:
    """The exit code of an API error of `kind`."""
    return EXIT_CODES.get(kind or "", EXIT_FAILED)
