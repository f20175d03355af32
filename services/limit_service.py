"""LimitService: the definitions of concurrency limits (docs/concurrency.md).

Served by the TaskService process, like GateService. A limit caps the RUNNING
tasks of one group (a namespace, a task type of it, or a concurrency key of
it; ``leasesched/concurrency.py``); this service keeps the definitions and
shows how many slots of each group are taken (``LimitView.running``, read at
most once a second per group: ``services/slot_use.py``). Claims read the
definitions (cached) and take slots of every limited group: nothing here
talks to the triggers, so a change takes effect at the next claim that reads
the table again.

``running`` is filled by GetLimit and ListLimits. SetLimit answers with 0
(its answer is the write's, not a read of the slots: a slot read failing
after the write landed must not make the caller retry it), and so does the
default key ``*``, which has no group of its own.

Every change is one conditional write on the row's version: a create is
``IF NOT EXISTS``, a change and a delete ``IF version = ?``. A lost race is
read again and decided again, so a stale ``expected_version`` is always
FAILED_PRECONDITION with nothing written.

Roles: GetLimit and ListLimits for client (own namespace) and admin tokens,
SetLimit and DeleteLimit for admin tokens only
(``leasesched/server/auth_interceptor.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Awaitable, TypeVar

import grpc

from leasesched import concurrency, limits
from leasesched.auth import require_namespace
from leasesched.concurrency import DEFAULT_KEY, ConcurrencyLimit, LimitKey, LimitScope, group_label, SlotGroup
from leasesched.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from leasesched.model import now_ms
from leasesched.server.validation import check_concurrency_key, check_namespace, check_type
from leasesched.store.base import StoreUnavailable, TaskStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import ts
from services.slot_use import SlotUse

T = TypeVar("T")

MAX_RACE_RETRIES = 5
LIST_PAGE_MAX = 1000
MAX_RUNNING = limits.Bound(
    "max_running", 1, concurrency.MAX_RUNNING, "", "the slots of a group are one partition, read whole at every claim"
)
# The proto's scope and the store's, both ways (UNSPECIFIED has none: refused).
SCOPE_FROM_PB: dict[pb.LimitScope, LimitScope] = {
    pb.LIMIT_SCOPE_NAMESPACE: LimitScope.NAMESPACE,
    pb.LIMIT_SCOPE_TYPE: LimitScope.TYPE,
    pb.LIMIT_SCOPE_KEY: LimitScope.KEY,
}
SCOPE_TO_PB: dict[LimitScope, pb.LimitScope] = {v: k for k, v in SCOPE_FROM_PB.items()}


def limit_ref(limit: ConcurrencyLimit) -> pb.LimitRef:
    return pb.LimitRef(namespace=limit.namespace, scope=SCOPE_TO_PB[limit.scope], name=limit.name)


def limit_view(limit: ConcurrencyLimit, running: int = 0) -> pb.LimitView:
    """``running``: the group's taken slots (``limit_group`` says which group; 0 when it has none)."""
    return pb.LimitView(
        limit=limit_ref(limit), max_running=limit.max_running, version=limit.version,
        created_at=ts(limit.created_at), updated_at=ts(limit.updated_at), running=running,
    )  # fmt: skip


def limit_group(limit: ConcurrencyLimit) -> SlotGroup | None:
    """The one group of slots the limit's tasks take, or None for the default
    key ``*``: every key under it has slots of its own (``concurrency.groups_for``),
    so it has no single number running."""
    if limit.scope == LimitScope.KEY and limit.name == DEFAULT_KEY:
        return None
    return SlotGroup(limit.namespace, limit.scope, limit.name, limit.max_running)


def check_ref(ref: pb.LimitRef, field: str = "limit") -> LimitKey:
    """The (namespace, scope, name) a request names, each part checked
    (INVALID_ARGUMENT naming the field), and the caller allowed in the namespace."""
    namespace = check_namespace(ref.namespace, f"{field}.namespace")
    require_namespace(namespace)
    scope = SCOPE_FROM_PB.get(ref.scope)
    if scope is None:
        raise InvalidArgument(f"{field}.scope must be set: LIMIT_SCOPE_NAMESPACE, LIMIT_SCOPE_TYPE or LIMIT_SCOPE_KEY")
    return namespace, scope, check_name(scope, ref.name, f"{field}.name")


def check_name(scope: LimitScope, name: str, field: str) -> str:
    """A namespace limit has no name; a type limit names a task type (the rule
    of TaskSpec.type); a key limit a concurrency key (the rule of
    TaskSpec.concurrency_key, but required) or ``*``: the default of every key."""
    if scope == LimitScope.NAMESPACE:
        if name:
            raise InvalidArgument(f"{field} must be empty for a namespace limit, not {name[:80]!r}")
        return ""
    if scope == LimitScope.TYPE:
        return check_type(name, field)
    if name == DEFAULT_KEY:
        return name
    if not name:
        raise InvalidArgument(f"{field} is required for a key limit: a concurrency key, or {DEFAULT_KEY!r} for every key")
    return check_concurrency_key(name, field)


def _page_token(key: LimitKey) -> str:
    namespace, scope, name = key
    return base64.urlsafe_b64encode(json.dumps([namespace, scope.value, name]).encode()).decode()


def _page_after(token: str, namespace: str | None) -> tuple[str, str, str] | None:
    """Where a page token resumes: the last (namespace, scope, name) listed,
    scope as its text (the listing's order). Anything a server did not issue
    for this listing is INVALID_ARGUMENT."""
    if not token:
        return None
    refused = InvalidArgument("page_token is not a token this server issued for this listing")
    if len(token) > limits.MAX_PAGE_TOKEN:
        raise refused
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused from None
    if not (isinstance(parts, list) and len(parts) == 3 and all(isinstance(p, str) for p in parts)):
        raise refused
    ns, scope_text, name = parts
    try:
        scope = LimitScope(scope_text)
        check_namespace(ns)
        check_name(scope, name, "page_token")
    except (ValueError, InvalidArgument):
        raise refused from None
    if namespace is not None and ns != namespace:
        raise refused
    return ns, scope.value, name


async def _store(call: Awaitable[T]) -> T:
    try:
        return await call
    except StoreUnavailable as exc:
        raise Unavailable(str(exc)) from exc


class LimitService(pb_grpc.LimitServiceServicer):
    def __init__(self, store: TaskStore, slots: SlotUse | None = None) -> None:
        """``slots``: the process's (shared with TaskService's waiting reasons); a new one when not given."""
        self._store = store
        self._slots = slots if slots is not None else SlotUse(store)

    async def _view(self, limit: ConcurrencyLimit) -> pb.LimitView:
        """The limit with its taken slots (read at most a second ago: ``SlotUse``)."""
        group = limit_group(limit)
        return limit_view(limit, 0 if group is None else await self._slots.taken(group))

    async def _get(self, key: LimitKey) -> ConcurrencyLimit:
        found = await _store(self._store.get_limit(*key))
        if found is None:
            raise NotFound(f"no concurrency limit {group_label(key)}")
        return found

    async def SetLimit(self, request: pb.SetLimitRequest, context: grpc.aio.ServicerContext) -> pb.SetLimitResponse:
        key = check_ref(request.limit)
        max_running = int(MAX_RUNNING.check(request.max_running))
        if request.expected_version < 0:
            raise InvalidArgument("expected_version must be >= 0")
        namespace, scope, name = key
        for _ in range(MAX_RACE_RETRIES):
            now = now_ms()
            if request.expected_version == 0:
                made = ConcurrencyLimit(namespace, scope, name, max_running, version=1, created_at=now, updated_at=now)
                if await _store(self._store.insert_limit(made)):
                    return pb.SetLimitResponse(limit=limit_view(made))
                if not request.create_or_update:
                    raise AlreadyExists(f"concurrency limit {group_label(key)} already exists (give expected_version to change it)")
            current = await _store(self._store.get_limit(*key))
            if current is None:
                if request.expected_version:
                    raise NotFound(f"no concurrency limit {group_label(key)}")
                continue  # deleted since the insert found it: create it again
            if request.expected_version and current.version != request.expected_version:
                raise FailedPrecondition(
                    f"concurrency limit {group_label(key)} is at version {current.version}, "
                    f"not expected_version {request.expected_version}"
                )
            changed = ConcurrencyLimit(
                namespace, scope, name, max_running, version=current.version + 1, created_at=current.created_at, updated_at=now
            )
            if await _store(self._store.update_limit(changed, current.version)):
                return pb.SetLimitResponse(limit=limit_view(changed))
            # Lost a race: with an expected_version the next read tells
            # FAILED_PRECONDITION; without one the change is decided again.
        raise Unavailable(f"concurrency limit {group_label(key)} kept changing; retry")

    async def GetLimit(self, request: pb.GetLimitRequest, context: grpc.aio.ServicerContext) -> pb.GetLimitResponse:
        return pb.GetLimitResponse(limit=await self._view(await self._get(check_ref(request.limit))))

    async def ListLimits(self, request: pb.ListLimitsRequest, context: grpc.aio.ServicerContext) -> pb.ListLimitsResponse:
        """One namespace's limits, or (empty namespace, admin only) every
        namespace's. The store returns them whole (a few rows per namespace);
        pages are cut here, resuming after the last (namespace, scope, name)."""
        namespace: str | None = None
        if request.namespace:
            namespace = check_namespace(request.namespace)
        require_namespace(request.namespace)  # "" (every namespace): admin only
        if request.page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        size = min(request.page_size or 100, LIST_PAGE_MAX)
        after = _page_after(request.page_token, namespace)
        found = await _store(self._store.list_limits(namespace))
        if after is not None:
            found = [v for v in found if (v.namespace, v.scope.value, v.name) > after]
        page, more = found[:size], len(found) > size
        token = _page_token(concurrency.limit_key(page[-1])) if more and page else ""
        # One read of slots per listed group (at most MAX_PARALLEL_READS at a time, each cached 1 s).
        views = await asyncio.gather(*(self._view(v) for v in page))
        return pb.ListLimitsResponse(limits=views, next_page_token=token)

    async def DeleteLimit(self, request: pb.DeleteLimitRequest, context: grpc.aio.ServicerContext) -> pb.DeleteLimitResponse:
        """The group's tasks are no longer held by it from the next claim on."""
        key = check_ref(request.limit)
        if request.expected_version < 0:
            raise InvalidArgument("expected_version must be >= 0")
        if await _store(self._store.delete_limit(*key, request.expected_version)):
            return pb.DeleteLimitResponse()
        current = await _store(self._store.get_limit(*key))
        if current is None:
            raise NotFound(f"no concurrency limit {group_label(key)}")
        raise FailedPrecondition(
            f"concurrency limit {group_label(key)} is at version {current.version}, not expected_version {request.expected_version}"
        )
