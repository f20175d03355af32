"""Domain errors: what went wrong, in the scheduler's words.

Services map each to one gRPC status code (``leasesched/server/error_mapping.py``);
the core never imports gRPC.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of the errors a caller can act on."""


class InvalidArgument(SchedulerError):
    pass


class NotFound(SchedulerError):
    pass


class FailedPrecondition(SchedulerError):
    """The task is not in a state that allows the request (finished, claimed, lease lost)."""


class AlreadyExists(SchedulerError):
    """An idempotency key is already bound to a different request."""


class Aborted(SchedulerError):
    """The task kept changing under a request (a lost race, retried and lost
    again): nothing is wrong with the request or the store; retry."""


class PermissionDenied(SchedulerError):
    pass


class Unavailable(SchedulerError):
    """A dependency (Cassandra, ZooKeeper) cannot be reached; safe to retry."""


class ResourceExhausted(SchedulerError):
    pass


class Unauthenticated(SchedulerError):
    """No credentials, or credentials the server does not accept."""
