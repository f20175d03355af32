"""Bearer tokens: each bound to one namespace and one role.

A token reads ``lsk_<id>_<secret>``. Only the SHA-256 of the secret is stored
(the secret has 256 bits of entropy, so a slow password hash adds nothing);
it is compared in constant time and never logged. The id lets the server find
the record without scanning.

Roles:
* ``client`` — the user API (TaskService) on its own namespace;
* ``worker`` — the worker API (TaskUpdater, trigger subscriptions) on its own namespace;
* ``operator`` — a person running its namespace's tasks: the reads (PollTask,
  ListTasks, CountTasks, GetTaskHistory; schedules, gates and limits as a
  client sees them) and the operator actions (OperatorService: retry,
  resume, mark failed, terminate, bulk) on its own namespace's tasks; it
  cannot schedule or cancel (a client's rights stay the client's);
* ``admin``  — everything, every namespace (also the operator actions, and
  services calling each other).

Lookups are cached for ``auth_cache_s`` so the hot path costs no store read;
a revoked token stops working within that time.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from leasesched.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from leasesched.store.base import StoreUnavailable

ROLES = ("client", "worker", "operator", "admin")
PREFIX = "lsk_"


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    secret_hash: bytes
    namespace: str
    role: str
    name: str = ""
    created_at: int = 0
    revoked: bool = False


@dataclass(frozen=True)
class Principal:
    token_id: str
    namespace: str
    role: str
    name: str = ""  # the token's name, when it was given one (history shows who acted)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


# The caller of the RPC being served; None when auth is off (local development).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(namespace: str, role: str, name: str = "") -> tuple[str, TokenRecord]:
    """A fresh token: the plaintext (shown once) and the record to store."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(token_id, _hash(secret), namespace, role, name, int(time.time() * 1000))
    return f"{PREFIX}{token_id}_{secret}", record


def parse(token: str) -> tuple[str, str]:
    if not token.startswith(PREFIX):
        raise Unauthenticated("malformed token")
    token_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(token_id) != 16 or not secret:
        raise Unauthenticated("malformed token")
    return token_id, secret


class TokenLookup(Protocol):
    async def get_token(self, token_id: str) -> TokenRecord | None: ...


class Authenticator:
    def __init__(self, store: TokenLookup, cache_s: float = 5.0) -> None:
        self._store = store
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        token_id, secret = parse(token.strip())
        record = await self._lookup(token_id)
        if record is None or record.revoked or not hmac.compare_digest(record.secret_hash, _hash(secret)):
            raise Unauthenticated("unknown or revoked token")
        return Principal(record.token_id, record.namespace, record.role, record.name)

    async def _lookup(self, token_id: str) -> TokenRecord | None:
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        try:
            record = await self._store.get_token(token_id)
        except StoreUnavailable as exc:
            raise Unavailable(f"cannot check the token: {exc}") from exc
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: unknown ids must not grow memory without end
        self._cache[token_id] = (now, record)
        return record


def require_namespace(namespace: str, what: str = "namespace") -> None:
    """The caller may act on ``namespace`` (always, when auth is off)."""
    principal = current_principal.get()
    if principal is None or principal.admin or principal.namespace == namespace:
        return
    raise PermissionDenied(f"token is not allowed in {what} {namespace!r}")


def operator_name() -> str:
    """Who performs an operator action, for the task's history: the calling
    token's name, else its id; "" with auth off (nobody is known)."""
    principal = current_principal.get()
    if principal is None:
        return ""
    return principal.name or principal.token_id


def caller_namespace() -> str | None:
    """The namespace a non-admin caller is confined to; None when unrestricted."""
    principal = current_principal.get()
    return None if principal is None or principal.admin else principal.namespace


@contextlib.contextmanager
def hiding_missing(task_id: object) -> Iterator[None]:
    """Turn NotFound into the same PERMISSION_DENIED a foreign task gets (non-admins)."""
    try:
        yield
    except NotFound:
        require_task_access(None, task_id)
        raise


def require_task_access(task_namespace: str | None, task_id: object) -> None:
    """For poll/cancel/claim: a foreign task and a missing one look the same to a
    non-admin caller, so it cannot learn whether another namespace's id exists."""
    principal = current_principal.get()
    if principal is None or principal.admin:
        return
    if task_namespace != principal.namespace:
        raise PermissionDenied(f"task {task_id} is not in namespace {principal.namespace!r} or does not exist")


def require_payload_access(field: str) -> None:
    """Task and schedule payloads are the owner's data: a client (its own
    namespace, checked apart) or an admin may read them; an operator, who runs
    tasks without needing their data, may not. Auth off: anyone."""
    principal = current_principal.get()
    if principal is not None and principal.role == "operator":
        raise PermissionDenied(f"{field}: an operator token may not read payloads (a client or admin token may)")

