"""GateService: named, cluster-wide rate limits (docs/gates.md).

Served by the TaskService process. Every change is one conditional write on
the gate row's version (and its closed_until, so that a handler's close
landing in between is never overwritten); a lost race is read again and
decided again. The triggers read the row when they hold tasks of the gate and
take tokens from it (``trigger/gates.py``); nothing here talks to them.

Roles: GetGate and ListGates for client (own namespace) and admin tokens,
every change for admin tokens only (``leasesched/server/auth_interceptor.py``).

``GateBook`` is the TaskService's view of the gates: whether a gate named by
ScheduleTask (or a schedule's action) exists (cached briefly, so a burst of gated tasks costs one read
per gate, not one per task) and why a gated task waits (PollTask's
``waiting_reason``).
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Awaitable, Callable

import grpc

from leasesched import gates, limits
from leasesched.auth import require_namespace
from leasesched.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from leasesched.gates import Gate, GateState
from leasesched.model import now_ms
from leasesched.server.validation import check_gate_name, check_namespace, duration_ms
from leasesched.store.base import StoreUnavailable, TaskStore
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.convert import ts

MAX_RACE_RETRIES = 5
LIST_PAGE_MAX = 1000
WARMUP = limits.Bound("definition.warmup", 0, gates.MAX_WARMUP_MS, "ms", "a ramp longer than a day is no ramp")
# How long GateBook trusts what it read for ScheduleTask's check: a gate
# deleted this long ago may still be named (its tasks then wait; a miss is
# never cached, so a gate just created is found at once).
GATE_CACHE_S = 5.0
# How old the gate behind PollTask's waiting_reason may be: one read per
# gate per second at most, however often its tasks are polled.
REASON_CACHE_S = 1.0


def gate_view(gate: Gate, now: int | None = None) -> pb.GateView:
    now = now_ms() if now is None else now
    view = pb.GateView(
        namespace=gate.namespace,
        name=gate.name,
        definition=pb.GateDefinition(rate=gate.rate, burst=gate.burst, max_in_flight=gate.max_in_flight),
        paused=gate.paused,
        state=gate.state(now).value,
        tokens_available=gates.available(gate, now * 1000),
        version=gate.version,
        created_at=ts(gate.created_at_ms),
        updated_at=ts(gate.updated_at_ms),
    )
    if gate.warmup_ms:
        view.definition.warmup.FromMilliseconds(gate.warmup_ms)
    if gate.closed_until_ms > now:
        view.closed_until.CopyFrom(ts(gate.closed_until_ms))
    return view


def waiting_reason(gate: Gate | None, name: str, now: int) -> str:
    """Why a SCHEDULED task of gate ``name`` is held now ("" = only by its rate, if at all)."""
    if gate is None:
        return f"gate {name!r} does not exist: the task waits until it is created"
    state = gate.state(now)
    if state == GateState.PAUSED:
        return f"gate {name!r} is paused"
    if state == GateState.CLOSED:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(gate.closed_until_ms / 1000))
        return f"gate {name!r} is closed until {until} (a handler was rate limited)"
    return ""


class GateBook:
    """The gates as the TaskService sees them: a short cache of rows that exist."""

    def __init__(self, store: TaskStore, cache_s: float = GATE_CACHE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._cache_s = cache_s
        self._clock = clock
        self._known: dict[tuple[str, str], tuple[float, Gate]] = {}

    async def get(self, namespace: str, name: str, max_age_s: float | None = None) -> Gate | None:
        """The gate, as read at most ``max_age_s`` (default: the cache's time) ago."""
        key = (namespace, name)
        hit = self._known.get(key)
        age = self._cache_s if max_age_s is None else max_age_s
        if hit is not None and self._clock() - hit[0] < age:
            return hit[1]
        try:
            gate = await self._store.get_gate(namespace, name)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if gate is None:
            self._known.pop(key, None)  # a miss is never cached: a gate just created is found at once
        else:
            if len(self._known) > 10_000:
                self._known.clear()  # bounded
            self._known[key] = (self._clock(), gate)
        return gate

    async def require(self, namespace: str, name: str, field: str = "task.gate") -> None:
        """FAILED_PRECONDITION naming ``field`` and the gate when ``name`` does not
        exist in ``namespace`` (``field``: where the request names it)."""
        if await self.get(namespace, name) is None:
            raise FailedPrecondition(
                f"{field} {name!r} does not exist in namespace {namespace!r} (create it with SetGate / leasesched gate set)"
            )


def _ref(ref: pb.GateRef) -> tuple[str, str]:
    namespace = check_namespace(ref.namespace, "gate.namespace")
    require_namespace(namespace)
    return namespace, check_gate_name(ref.name, "gate.name")


def _definition(d: pb.GateDefinition) -> tuple[float, int, int, int]:
    warmup = duration_ms(d.warmup, WARMUP, "definition.warmup")
    try:
        gates.check_definition(d.rate, d.burst, warmup, d.max_in_flight)
    except ValueError as exc:
        raise InvalidArgument(f"definition.{exc}") from None
    return d.rate, d.burst, warmup, d.max_in_flight


def _page_after(token: str) -> str:
    if not token:
        return ""
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not a token this server issued") from None
    if len(token) > limits.MAX_PAGE_TOKEN or not limits.matches(limits.GATE_RE, after):
        raise InvalidArgument("page_token is not a token this server issued")
    return after


class GateService(pb_grpc.GateServiceServicer):
    def __init__(self, store: TaskStore) -> None:
        self._store = store

    async def _get(self, namespace: str, name: str, serial: bool = False) -> Gate:
        try:
            found = await self._store.get_gate(namespace, name, serial=serial)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if found is None:
            raise NotFound(f"gate {name!r} not found in namespace {namespace!r}")
        return found

    async def _change(self, namespace: str, name: str, change: Callable[[Gate, int], Gate | None]) -> Gate:
        """Read, decide (``change`` returns the new row, or None: nothing to
        write), write conditionally; a lost race is decided again."""
        serial = False
        for _ in range(MAX_RACE_RETRIES):
            current = await self._get(namespace, name, serial=serial)
            now = now_ms()
            new = change(current, now)
            if new is None:
                return current
            new = new.replace(version=current.version + 1, updated_at_ms=now)
            if await self._write(self._store.update_gate(new, current)):
                return new
            serial = True
        raise Unavailable(f"gate {namespace}/{name} kept changing; retry")

    @staticmethod
    async def _write(write: Awaitable[bool]) -> bool:
        try:
            return await write
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def SetGate(self, request: pb.SetGateRequest, context: grpc.aio.ServicerContext) -> pb.SetGateResponse:
        namespace, name = _ref(request.gate)
        rate, burst, warmup, max_in_flight = _definition(request.definition)
        if request.expected_version < 0:
            raise InvalidArgument("expected_version must be >= 0")
        now = now_ms()
        if request.expected_version == 0:
            gate = Gate(
                namespace, name, rate, burst, warmup, max_in_flight=max_in_flight, version=1, created_at_ms=now, updated_at_ms=now
            )
            if await self._write(self._store.insert_gate(gate)):
                return pb.SetGateResponse(gate=gate_view(gate, now))
            if not request.create_or_update:
                raise AlreadyExists(f"gate {name!r} already exists in namespace {namespace!r} (give expected_version to change it)")

        def redefine(current: Gate, now: int) -> Gate:
            if request.expected_version and current.version != request.expected_version:
                raise FailedPrecondition(
                    f"gate {name!r} is at version {current.version}, not expected_version {request.expected_version}"
                )
            return current.replace(rate=rate, burst=burst, warmup_ms=warmup, max_in_flight=max_in_flight)

        return pb.SetGateResponse(gate=gate_view(await self._change(namespace, name, redefine)))

    async def GetGate(self, request: pb.GetGateRequest, context: grpc.aio.ServicerContext) -> pb.GetGateResponse:
        namespace, name = _ref(request.gate)
        return pb.GetGateResponse(gate=gate_view(await self._get(namespace, name)))

    async def ListGates(self, request: pb.ListGatesRequest, context: grpc.aio.ServicerContext) -> pb.ListGatesResponse:
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        if request.page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        size = min(request.page_size or 100, LIST_PAGE_MAX)
        after = _page_after(request.page_token)
        try:
            found = await self._store.list_gates(namespace, after, size + 1)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        page, more = found[:size], len(found) > size
        now = now_ms()
        token = base64.urlsafe_b64encode(page[-1].name.encode()).decode() if more and page else ""
        return pb.ListGatesResponse(gates=[gate_view(g, now) for g in page], next_page_token=token)

    async def PauseGate(self, request: pb.PauseGateRequest, context: grpc.aio.ServicerContext) -> pb.PauseGateResponse:
        namespace, name = _ref(request.gate)
        gate = await self._change(namespace, name, lambda g, now: None if g.paused else g.replace(paused=True))
        return pb.PauseGateResponse(gate=gate_view(gate))

    async def UnpauseGate(self, request: pb.UnpauseGateRequest, context: grpc.aio.ServicerContext) -> pb.UnpauseGateResponse:
        """Opens the gate (paused cleared, and a handler's close too) and starts the warm-up ramp."""
        namespace, name = _ref(request.gate)

        def unpause(gate: Gate, now: int) -> Gate | None:
            if not gate.paused and gate.closed_until_ms <= now:
                return None
            return gate.replace(paused=False, closed_until_ms=0, ramp_from_ms=now if gate.warmup_ms else 0)

        return pb.UnpauseGateResponse(gate=gate_view(await self._change(namespace, name, unpause)))

    async def DeleteGate(self, request: pb.DeleteGateRequest, context: grpc.aio.ServicerContext) -> pb.DeleteGateResponse:
        """Tasks that name a deleted gate wait (SCHEDULED) until a gate of that name exists again."""
        namespace, name = _ref(request.gate)
        current = await self._get(namespace, name)
        version = request.expected_version or current.version
        if request.expected_version and current.version != request.expected_version:
            raise FailedPrecondition(f"gate {name!r} is at version {current.version}, not expected_version {version}")
        if not await self._write(self._store.delete_gate(namespace, name, version)):
            raise FailedPrecondition(f"gate {name!r} changed while deleting; read it and retry")
        return pb.DeleteGateResponse()
