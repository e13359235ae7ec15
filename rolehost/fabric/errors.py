"""What an operation refuses or fails with, in the domain's words.

The controller, the instances, the package store and the walks raise these to refuse an
operation or report that it failed: none of them knows it is answered over HTTP. The API's
`ANSWERS` (api.py) gives each its status and its `kind`, and the CLI's `EXIT_CODES`
(exits.py) gives each kind its exit code: a new error type needs a row in both, and
tests/test_errors.py fails until it has them.
"""

from __future__ import annotations


class DomainError(Exception):
    """An operation refused, or one that did not end well; the message is for a person."""


class Invalid(DomainError):
    """What was asked for is malformed: a bad name, argument, value or body. Asking again
    the same way will not help."""


class NotFound(DomainError):
    """What was named does not exist: an instance, a role, a package, a walk, a route."""


class Conflict(DomainError):
    """Not now: another operation is under way, or what it acts on is in a state that
    refuses it (an instance stopped, a walk not paused). It can be asked again later."""


class DoesNotLoad(DomainError):
    """A package that is there and cannot run: its definition is invalid, or an entry
    point does not load."""


class Unavailable(DomainError):
    """Nothing is there to operate on: the controller did not start, or it is stopping
    (in run-instance: the instance is not started, ready or live)."""


class OperationFailed(DomainError):
    """The operation ran, and did not end well: an instance not ready after it, a change
    that halted in an update domain. Unlike the refusals, something was touched."""


class RefusedInPreflight(DomainError):
    """A deploy refused by its preflight, before any instance was touched, for `reason`
    (NotFound, Conflict or DoesNotLoad): a script tells it from a walk that
    failed, whatever the reason."""

    def __init__(self, reason: DomainError) -> None:
        super().__init__(str(reason))
        self.reason = reason
