"""ScheduleService: periodic schedules (create, change, look at, run now, backfill).

Served by the TaskService process. Each change is one conditional write on
the schedule's version; the ones that may run a slot at once (trigger,
backfill, unpause, update) go through ``leasesched.firing`` exactly as the
trigger's own evaluation does, so a slot decided here can never be decided
again there. The trigger owning the schedule's shard does the periodic
firing (``trigger/schedule_firer.py``); a change here writes the due entry
that makes it look at the schedule when it should.

Roles and isolation as for tasks: a client token acts in its own namespace
only; a schedule of another namespace, or none, is NOT_FOUND either way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from typing import Awaitable, Callable

import grpc

from leasesched import limits
from leasesched.auth import current_principal, require_namespace
from leasesched.config import Config
from leasesched.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from leasesched.firing import Firing, Plan, decide, pause, schedule_entry, trigger_now, unpause
from leasesched.lifecycle import Lifecycle
from leasesched.model import Task, now_ms, shard_of
from leasesched.schedules import BACKFILL_LIMIT, BACKFILLS_PENDING, Backfill, Schedule, ScheduleState
from leasesched.server.schedule_validation import ACTION, Definition, check_note, check_ref, definition_from_pb, overlap_from_pb
from leasesched.server.validation import check_namespace, timestamp_ms
from leasesched.store.base import StoreUnavailable
from leasesched.store.schedule_codec import BadScheduleDocument
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc
from services.gate_service import GateBook
from services.schedule_convert import describe

log = logging.getLogger(__name__)

DueHint = Callable[[Task], Awaitable[None]]
MAX_RACE_RETRIES = 5
LIST_PAGE_MAX = 1000


def _page_after(token: str) -> str:
    if not token:
        return ""
    if len(token) > limits.MAX_PAGE_TOKEN:
        raise InvalidArgument("page_token is not a token this server issued")
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not a token this server issued") from None
    if not limits.matches(limits.SCHEDULE_ID_RE, after):
        raise InvalidArgument("page_token is not a token this server issued")
    return after


class ScheduleService(pb_grpc.ScheduleServiceServicer):
    def __init__(
        self, cfg: Config, lifecycle: Lifecycle, shards: int, notify_due: DueHint | None = None, gates: GateBook | None = None
    ) -> None:
        """``gates``: the process's GateBook (shared with TaskService, so both
        read a gate once per few seconds); a new one when not given."""
        self._cfg = cfg
        self._lifecycle = lifecycle
        self._store = lifecycle.store
        self._shards = shards
        self._notify_due = notify_due
        self._gates = gates if gates is not None else GateBook(lifecycle.store)
        self._firing = Firing(self._store, lifecycle, on_created=self._created, confirm=True)

    # ------------------------------------------------------------ helpers

    async def _created(self, task: Task) -> None:
        """A run created here (trigger, backfill): hint the shard's trigger when
        it is due now (a jittered one is found by the trigger's scan in time)."""
        if self._notify_due is not None and task.run_at <= now_ms():
            await self._notify_due(task)

    async def _definition(self, schedule: pb.Schedule, now: int) -> Definition:
        """The request's definition, checked; a gate its action names must
        exist, as for ScheduleTask (docs/design.md, "Gates": a typo would
        otherwise run every task of the schedule unlimited). A gate deleted
        later holds the schedule's tasks (SCHEDULED, waiting_reason says so)."""
        d = definition_from_pb(schedule, self._cfg, now)
        if d.action.gate:
            await self._gates.require(d.namespace, d.action.gate, field=f"{ACTION}gate")
        return d

    async def _get(self, namespace: str, schedule_id: str, serial: bool = False) -> Schedule:
        require_namespace(namespace)
        try:
            found = await self._store.get_schedule(namespace, schedule_id, serial=serial)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        except BadScheduleDocument as exc:
            raise FailedPrecondition(f"schedule {namespace}/{schedule_id} cannot be read: {exc}") from exc
        if found is None:
            raise NotFound(f"schedule {schedule_id!r} not found in namespace {namespace!r}")
        return found

    async def _describe(self, schedule: Schedule, with_runs: bool = True) -> pb.ScheduleDescription:
        statuses = {}
        if with_runs:
            runs = schedule.state.recent
            try:
                found = await asyncio.gather(*(self._lifecycle.read(r.task_id) for r in runs))
            except StoreUnavailable:
                found = [None] * len(runs)  # the runs without their states: still worth showing
            statuses = {r.task_id: (t.status if t is not None else None) for r, t in zip(runs, found)}
        return describe(schedule, statuses, with_runs=with_runs)

    async def _evaluate(self, namespace: str, schedule_id: str, decider: Callable[[Schedule, ScheduleState, int], Plan]) -> tuple[Schedule, Plan]:
        require_namespace(namespace)
        try:
            result = await self._firing.evaluate(namespace, schedule_id, decider=decider)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if result.schedule is None or result.plan is None:
            raise NotFound(f"schedule {schedule_id!r} not found in namespace {namespace!r}")
        return result.schedule, result.plan

    # ------------------------------------------------------------ RPCs

    async def CreateSchedule(self, request: pb.CreateScheduleRequest, context: grpc.aio.ServicerContext) -> pb.CreateScheduleResponse:
        now = now_ms()
        require_namespace(check_namespace(request.schedule.namespace, "schedule.namespace"))
        d = await self._definition(request.schedule, now)
        uid = uuid.uuid4()
        state = ScheduleState(
            next_slot_ms=d.spec.next_after(now - 1), paused=d.paused, note=d.note,
            limited_actions=d.limited_actions, remaining_actions=d.remaining_actions,
        )  # fmt: skip
        schedule = Schedule(
            namespace=d.namespace, schedule_id=d.schedule_id, uid=uid, shard=shard_of(uid, self._shards),
            spec=d.spec, action=d.action, policy=d.policy, state=state, version=1, created_at_ms=now, updated_at_ms=now,
        )  # fmt: skip
        try:
            plan = decide(schedule, state, now)
            if plan.next_eval_ms is not None:  # the entry first: a crash after it leaves only a no-op look
                await self._store.add_due(schedule_entry(schedule, plan.next_eval_ms))
            created = await self._store.insert_schedule(schedule)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if not created:
            existing = await self._get(d.namespace, d.schedule_id)
            if _same_definition(existing, d):  # a retried create: the same answer
                return pb.CreateScheduleResponse(schedule=await self._describe(existing))
            raise AlreadyExists(f"schedule {d.schedule_id!r} already exists in namespace {d.namespace!r} with another definition")
        log.info("schedule %s created: %s", schedule.ref, d.spec.describe())
        return pb.CreateScheduleResponse(schedule=await self._describe(schedule))

    async def UpdateSchedule(self, request: pb.UpdateScheduleRequest, context: grpc.aio.ServicerContext) -> pb.UpdateScheduleResponse:
        now = now_ms()
        require_namespace(check_namespace(request.schedule.namespace, "schedule.namespace"))
        if request.expected_version < 0:
            raise InvalidArgument(f"expected_version {request.expected_version} is negative")
        d = await self._definition(request.schedule, now)
        expected = request.expected_version

        def edit(current: Schedule) -> Schedule:
            if expected and current.version != expected:
                raise FailedPrecondition(
                    f"schedule {d.schedule_id!r} is at version {current.version}, not {expected}; nothing was changed"
                )
            state = current.state.replace(limited_actions=d.limited_actions, remaining_actions=d.remaining_actions)
            if d.spec != current.spec:  # a new spec's first slot is its first one from now on
                state = state.replace(next_slot_ms=d.spec.next_after(now_ms() - 1))
            return current.replace(spec=d.spec, action=d.action, policy=d.policy, state=state)

        require_namespace(d.namespace)
        try:
            result = await self._firing.evaluate(d.namespace, d.schedule_id, edit=edit)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        if result.schedule is None:
            raise NotFound(f"schedule {d.schedule_id!r} not found in namespace {d.namespace!r}")
        log.info("schedule %s updated to version %d", result.schedule.ref, result.schedule.version)
        return pb.UpdateScheduleResponse(schedule=await self._describe(result.schedule))

    async def DeleteSchedule(self, request: pb.DeleteScheduleRequest, context: grpc.aio.ServicerContext) -> pb.DeleteScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        if request.expected_version < 0:
            raise InvalidArgument(f"expected_version {request.expected_version} is negative")
        for _ in range(MAX_RACE_RETRIES):
            current = await self._get(namespace, schedule_id, serial=True)
            if request.expected_version and current.version != request.expected_version:
                raise FailedPrecondition(
                    f"schedule {schedule_id!r} is at version {current.version}, not {request.expected_version}; nothing was deleted"
                )
            try:
                if await self._store.delete_schedule(namespace, schedule_id, current.version):
                    log.info("schedule %s deleted", current.ref)
                    return pb.DeleteScheduleResponse()
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from exc
        raise FailedPrecondition(f"schedule {schedule_id!r} kept changing while it was deleted; try again")

    async def DescribeSchedule(self, request: pb.DescribeScheduleRequest, context: grpc.aio.ServicerContext) -> pb.DescribeScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        described = await self._describe(await self._get(namespace, schedule_id))
        return pb.DescribeScheduleResponse(schedule=_payload_for_caller(described))

    async def ListSchedules(self, request: pb.ListSchedulesRequest, context: grpc.aio.ServicerContext) -> pb.ListSchedulesResponse:
        namespace = check_namespace(request.namespace)
        require_namespace(namespace)
        if not 0 <= request.page_size <= LIST_PAGE_MAX:
            raise InvalidArgument(f"page_size {request.page_size} is out of range 0..{LIST_PAGE_MAX}")
        size = request.page_size or 100
        after = _page_after(request.page_token)
        try:
            found = await self._store.list_schedules(namespace, after, size)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        except BadScheduleDocument as exc:
            raise FailedPrecondition(f"a schedule of namespace {namespace!r} cannot be read: {exc}") from exc
        token = ""
        if len(found) == size:
            token = base64.urlsafe_b64encode(found[-1].schedule_id.encode()).decode()
        return pb.ListSchedulesResponse(
            schedules=[_payload_for_caller(describe(s, {}, with_runs=False)) for s in found], next_page_token=token
        )

    async def PauseSchedule(self, request: pb.PauseScheduleRequest, context: grpc.aio.ServicerContext) -> pb.PauseScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        note = check_note(request.note) or "paused"
        schedule, _ = await self._evaluate(namespace, schedule_id, lambda s, st, t: pause(st, note))
        log.info("schedule %s paused: %s", schedule.ref, note)
        return pb.PauseScheduleResponse(schedule=await self._describe(schedule))

    async def UnpauseSchedule(self, request: pb.UnpauseScheduleRequest, context: grpc.aio.ServicerContext) -> pb.UnpauseScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        note = check_note(request.note)
        schedule, _ = await self._evaluate(namespace, schedule_id, lambda s, st, t: unpause(s, st, t, note))
        log.info("schedule %s unpaused", schedule.ref)
        return pb.UnpauseScheduleResponse(schedule=await self._describe(schedule))

    async def TriggerSchedule(self, request: pb.TriggerScheduleRequest, context: grpc.aio.ServicerContext) -> pb.TriggerScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        overlap = overlap_from_pb(request.overlap, "overlap")
        schedule, plan = await self._evaluate(namespace, schedule_id, lambda s, st, t: trigger_now(s, st, t, overlap))
        task_id = str(plan.fire[0].task_id) if plan.fire else ""
        nominal = plan.fire[0].slot_ms if plan.fire else None
        log.info("schedule %s triggered: %s %s", schedule.ref, plan.outcome, task_id)
        response = pb.TriggerScheduleResponse(task_id=task_id, outcome=plan.outcome)
        if nominal is not None:
            response.nominal_time.FromMilliseconds(nominal)
        return response

    async def BackfillSchedule(self, request: pb.BackfillScheduleRequest, context: grpc.aio.ServicerContext) -> pb.BackfillScheduleResponse:
        namespace, schedule_id = check_ref(request.ref)
        overlap = overlap_from_pb(request.overlap, "overlap")
        if not request.HasField("start_at") or not request.HasField("end_at"):
            raise InvalidArgument("start_at and end_at are required")
        start, end = timestamp_ms(request.start_at, "start_at"), timestamp_ms(request.end_at, "end_at")
        if not 0 <= start <= limits.MAX_STORED_TIME_MS or not 0 <= end <= limits.MAX_STORED_TIME_MS:
            raise InvalidArgument("start_at and end_at must be between 1970 and 9999-12-31")
        if end < start:
            raise InvalidArgument("end_at is before start_at")
        current = await self._get(namespace, schedule_id)
        # Slots from the next regular one on are left to the regular firing (counted as it will be worked).
        nxt = current.state.next_slot_ms
        counted_end = end if nxt is None else min(end, nxt - 1)
        slots = current.spec.count(start - 1, counted_end, BACKFILL_LIMIT + 1) if counted_end >= start else 0
        if slots > BACKFILL_LIMIT:
            raise InvalidArgument(f"the range holds more than {BACKFILL_LIMIT} slots; backfill it in parts")
        backfill = Backfill(start, end, overlap)

        def decider(s: Schedule, st: ScheduleState, t: int) -> Plan:
            if len(st.backfills) >= BACKFILLS_PENDING:
                raise FailedPrecondition(f"schedule {schedule_id!r} already has {BACKFILLS_PENDING} backfills waiting")
            return decide(s, st.replace(backfills=st.backfills + (backfill,)), t)

        if slots:
            schedule, _ = await self._evaluate(namespace, schedule_id, decider)
            log.info("schedule %s: backfill of %d slots queued", schedule.ref, slots)
        return pb.BackfillScheduleResponse(slots=slots)


def _same_definition(existing: Schedule, d: Definition) -> bool:
    return (existing.spec, existing.action, existing.policy) == (d.spec, d.action, d.policy)


def _payload_for_caller(described: pb.ScheduleDescription) -> pb.ScheduleDescription:
    """An operator may read schedules but not payloads (``auth.require_payload_access``):
    the action's payload is left out for it, never refused, so the rest stays readable."""
    principal = current_principal.get()
    if principal is not None and principal.role == "operator":
        described.schedule.action.payload = b""
    return described

