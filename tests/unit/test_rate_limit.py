"""Per-namespace quotas (services/rate_limit.py) without a server: each bucket,
the concurrency share (released on success, error, abort and cancellation),
and whose quota a call uses (token namespace, admin, peer)."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from leasesched.auth import Principal, current_principal
from leasesched.config import Config
from leasesched.v1 import scheduler_pb2 as pb
from services import rate_limit
from services.rate_limit import (
    CANCEL_METHOD,
    LIST_METHOD,
    POLL_METHOD,
    SCHEDULE_METHOD,
    ConcurrencyShare,
    QuotaInterceptor,
    Quotas,
    RateLimiter,
    caller_of,
    list_cost,
)


class Aborted(Exception):
    """What grpc.aio's context.abort raises, in these tests."""


@dataclass
class FakeContext:
    peer_address: str = "ipv4:127.0.0.1:40000"
    trailing: tuple[tuple[str, str], ...] = ()
    status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self.peer_address

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Handler:
    """The inner handler: records calls; can fail or block until released."""

    calls: int = 0
    fail: BaseException | None = None
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Any, context: Any) -> str:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return "ok"


def quotas(**kw: Any) -> Quotas:
    base: dict[str, Any] = dict(
        write_rate=2.0, write_burst=2.0, read_rate=3.0, read_burst=3.0,
        max_concurrent_per_caller=2, process_max_concurrent=8, list_page_max=1000,
    )  # fmt: skip
    return Quotas(**{**base, **kw})


def as_principal(namespace: str, role: str = "client", token_id: str = "t1") -> None:
    """What the auth interceptor does. Each async test runs in its own task, so
    this stays within the test; the one sync test runs in a copied context."""
    current_principal.set(Principal(token_id, namespace, role))


async def call(interceptor: QuotaInterceptor, method: str, request: Any, handler: Handler, ctx: FakeContext | None = None) -> str:
    return str(await interceptor.wrap(handler, method)(request, ctx or FakeContext()))


def refused(ctx: FakeContext) -> str:
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    return ctx.status[1]


# --------------------------------------------------------------- the buckets


def test_token_bucket_refills_at_its_rate_and_tells_the_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=2.0, clock=clock)
    assert limiter.wait_needed("a") == 0.0 and limiter.wait_needed("a") == 0.0
    assert limiter.wait_needed("a") == pytest.approx(0.5)
    assert limiter.wait_needed("b") == 0.0  # another key, another bucket
    clock.now += 0.5
    assert limiter.wait_needed("a") == 0.0


def test_a_cost_above_the_burst_is_charged_as_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=5.0, clock=clock)
    assert limiter.wait_needed("a", cost=100.0) == 0.0  # would otherwise never pass
    assert limiter.wait_needed("a", cost=1.0) == pytest.approx(1.0)


def test_buckets_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rate_limit, "MAX_BUCKETS", 10)
    limiter = RateLimiter(rate=1.0, burst=1.0, clock=Clock())
    for i in range(25):
        limiter.wait_needed(f"peer:{i}")
        assert len(limiter) <= 10


def test_list_cost_follows_the_page_size() -> None:
    assert list_cost(pb.ListTasksRequest(page_size=0), 1000) == 10.0  # the default page of 100
    assert list_cost(pb.ListTasksRequest(page_size=1), 1000) == 1.0
    assert list_cost(pb.ListTasksRequest(page_size=25), 1000) == 3.0
    assert list_cost(pb.ListTasksRequest(page_size=1000), 1000) == 100.0
    assert list_cost(pb.ListTasksRequest(page_size=50_000), 1000) == 100.0  # refused later anyway
    assert list_cost(pb.ListTasksRequest(page_size=-5), 1000) == 1.0


async def test_write_bucket_covers_schedule_and_cancel() -> None:
    as_principal("team-a")
    interceptor, handler = QuotaInterceptor(quotas(), Clock()), Handler()
    await call(interceptor, SCHEDULE_METHOD, pb.ScheduleTaskRequest(), handler)
    await call(interceptor, CANCEL_METHOD, pb.CancelTaskRequest(), handler)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, SCHEDULE_METHOD, pb.ScheduleTaskRequest(), handler, ctx)
    message = refused(ctx)
    assert "namespace 'team-a'" in message and "write rate limit" in message and "2/s, burst 2" in message
    assert "retry after 500 ms" in message and dict(ctx.trailing) == {"retry-after-ms": "500"}
    # Reads have their own bucket: still full.
    assert await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler) == "ok"
    assert handler.calls == 3


async def test_read_bucket_covers_poll_and_list_by_page_size() -> None:
    as_principal("team-a")
    clock = Clock()
    interceptor, handler = QuotaInterceptor(quotas(read_rate=10.0, read_burst=10.0), clock), Handler()
    await call(interceptor, LIST_METHOD, pb.ListTasksRequest(page_size=80), handler)  # 8 tokens
    await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)
    await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler, ctx)
    message = refused(ctx)
    assert "namespace 'team-a'" in message and "read rate limit" in message and "PollTask/ListTasks/schedule reads: 10/s" in message
    clock.now += 0.5  # 5 tokens back: not enough for a default page (10)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, LIST_METHOD, pb.ListTasksRequest(), handler, ctx)
    assert "this ListTasks costs 10" in refused(ctx) and dict(ctx.trailing) == {"retry-after-ms": "500"}
    # Writes were not touched.
    assert await call(interceptor, SCHEDULE_METHOD, pb.ScheduleTaskRequest(), handler) == "ok"


async def test_a_rate_of_zero_switches_the_bucket_off() -> None:
    as_principal("team-a")
    interceptor, handler = QuotaInterceptor(quotas(read_rate=0.0, write_rate=0.0), Clock()), Handler()
    for _ in range(50):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)
        await call(interceptor, SCHEDULE_METHOD, pb.ScheduleTaskRequest(), handler)
    assert handler.calls == 100


# ------------------------------------------------------------ whose quota


def test_caller_is_the_token_namespace_or_the_peer() -> None:
    contextvars.copy_context().run(check_callers)


def check_callers() -> None:
    ctx = FakeContext(peer_address="ipv4:10.0.0.7:5555")
    auth_off = rate_limit.Caller("peer:ipv4:10.0.0.7:5555", "peer 'ipv4:10.0.0.7:5555'", fair_share=False)
    assert caller_of(ctx) == auth_off
    as_principal("team-a", token_id="tok-1")
    assert caller_of(ctx) == rate_limit.Caller("namespace:team-a", "namespace 'team-a'")
    as_principal("team-a", token_id="tok-2")  # another token of the same namespace: the same quota
    assert caller_of(ctx) == rate_limit.Caller("namespace:team-a", "namespace 'team-a'")
    as_principal("ops", role="admin")
    assert caller_of(ctx) is None


async def test_a_request_naming_a_foreign_namespace_is_charged_to_the_caller() -> None:
    """Team B cannot spend team A's budget by sending (refused) requests naming team A."""
    interceptor, handler = QuotaInterceptor(quotas(), Clock()), Handler()
    foreign = pb.ScheduleTaskRequest(task=pb.TaskSpec(namespace="team-a"))
    as_principal("team-b")
    await call(interceptor, SCHEDULE_METHOD, foreign, handler)
    await call(interceptor, SCHEDULE_METHOD, foreign, handler)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, SCHEDULE_METHOD, foreign, handler, ctx)
    assert "namespace 'team-b'" in refused(ctx)
    as_principal("team-a")
    assert await call(interceptor, SCHEDULE_METHOD, foreign, handler) == "ok"


async def test_without_auth_each_peer_has_its_own_quota() -> None:
    interceptor, handler = QuotaInterceptor(quotas(), Clock()), Handler()
    one, two = "ipv4:127.0.0.1:1111", "ipv4:127.0.0.1:2222"
    for _ in range(3):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler, FakeContext(one))
    ctx = FakeContext(one)
    with pytest.raises(Aborted):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler, ctx)
    assert f"peer {one!r}" in refused(ctx)
    assert await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler, FakeContext(two)) == "ok"


async def test_without_auth_only_the_buckets_and_the_total_apply() -> None:
    """No per-peer concurrency share: one local client (one connection) may use the whole process."""
    interceptor = QuotaInterceptor(quotas(read_rate=0.0, max_concurrent_per_caller=1, process_max_concurrent=3), Clock())
    slow = Handler(gate=asyncio.Event())
    held = await start_held(interceptor, 3, slow)  # same peer, more than its "share"
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler(), ctx)
    assert "this TaskService has 3 calls in progress, its limit (PollTask from peer" in refused(ctx)
    assert slow.gate is not None
    slow.gate.set()
    await asyncio.gather(*held)


async def test_admins_have_no_quota() -> None:
    as_principal("ops", role="admin")
    interceptor, handler = QuotaInterceptor(quotas(max_concurrent_per_caller=1), Clock()), Handler()
    for _ in range(20):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)
    handler.gate = asyncio.Event()
    held = [asyncio.ensure_future(call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)) for _ in range(3)]
    await asyncio.sleep(0)
    handler.gate.set()
    assert await asyncio.gather(*held) == ["ok"] * 3


# ---------------------------------------------------- the concurrency share


def test_concurrency_share_counts_per_key_and_forgets_idle_keys() -> None:
    share = ConcurrencyShare(per_key=2)
    assert share.try_acquire("a") is None and share.try_acquire("a") is None
    assert share.try_acquire("a") == rate_limit.SHARE
    assert share.try_acquire("b") is None
    share.release("a")
    assert share.try_acquire("a") is None
    for key in ("a", "a", "b"):
        share.release(key)
    assert len(share) == 0 and share.in_progress == 0


def test_process_total_counts_admitted_calls_only() -> None:
    """A namespace at its share is refused without touching the total; admins count in the total."""
    share = ConcurrencyShare(per_key=2, total=3)
    assert share.try_acquire("a") is None and share.try_acquire("a") is None
    for _ in range(100):  # a flood of refused calls...
        assert share.try_acquire("a") == rate_limit.SHARE
    assert share.in_progress == 2  # ...holds no slot
    assert share.try_acquire(None) is None  # an admin: no share, but a slot of the total
    assert share.try_acquire("b") == rate_limit.PROCESS
    assert share.try_acquire("a") == rate_limit.SHARE  # its own limit is named first
    share.release(None)
    assert share.try_acquire("b") is None and share.in_progress == 3


async def start_held(interceptor: QuotaInterceptor, n: int, handler: Handler) -> list[asyncio.Future[str]]:
    """``n`` polls that are inside the handler, blocked on its gate."""
    calls: list[asyncio.Future[str]] = []
    for _ in range(n):
        handler.entered.clear()
        calls.append(asyncio.ensure_future(call(interceptor, POLL_METHOD, pb.PollTaskRequest(), handler)))
        await asyncio.wait_for(handler.entered.wait(), 5)
    return calls


async def test_share_refuses_beyond_the_limit_and_not_other_namespaces() -> None:
    as_principal("team-a")
    interceptor = QuotaInterceptor(quotas(read_rate=0.0), Clock())
    share = interceptor.state.share
    assert share is not None
    slow = Handler(gate=asyncio.Event())
    held = await start_held(interceptor, 2, slow)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, LIST_METHOD, pb.ListTasksRequest(), Handler(), ctx)
    message = refused(ctx)
    assert "namespace 'team-a'" in message and "2 TaskService calls in progress" in message
    assert "share of this server's 8" in message and "ListTasks, read group" in message
    assert dict(ctx.trailing) == {"retry-after-ms": str(rate_limit.CONCURRENCY_RETRY_MS)}
    assert share.held("namespace:team-a") == 2  # the refused call took nothing

    async def as_team_b() -> str:
        current_principal.set(Principal("t2", "team-b", "client"))
        return await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler())

    assert await asyncio.ensure_future(as_team_b()) == "ok"
    assert slow.gate is not None
    slow.gate.set()
    assert await asyncio.gather(*held) == ["ok", "ok"]
    assert len(share) == 0 and share.in_progress == 0


async def test_the_process_total_refuses_with_its_own_message() -> None:
    as_principal("team-a")
    interceptor = QuotaInterceptor(quotas(read_rate=0.0, max_concurrent_per_caller=5, process_max_concurrent=2), Clock())
    slow = Handler(gate=asyncio.Event())
    held = await start_held(interceptor, 2, slow)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler(), ctx)
    assert "this TaskService has 2 calls in progress, its limit (PollTask from namespace 'team-a')" in refused(ctx)
    assert dict(ctx.trailing) == {"retry-after-ms": str(rate_limit.CONCURRENCY_RETRY_MS)}
    assert slow.gate is not None
    slow.gate.set()
    await asyncio.gather(*held)
    assert await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler()) == "ok"


@pytest.mark.parametrize("ending", ["error", "abort", "rate-refused"])
async def test_share_is_released_when_the_call_fails(ending: str) -> None:
    as_principal("team-a")
    interceptor = QuotaInterceptor(quotas(max_concurrent_per_caller=1, read_rate=1.0, read_burst=1.0), Clock())
    share = interceptor.state.share
    assert share is not None
    if ending == "error":
        with pytest.raises(RuntimeError):
            await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler(fail=RuntimeError("store down")))
    elif ending == "abort":
        with pytest.raises(Aborted):
            await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler(fail=Aborted("NOT_FOUND")))
    else:
        await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler())
        ctx = FakeContext()
        with pytest.raises(Aborted):
            await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler(), ctx)
        assert "read rate limit" in refused(ctx)
    assert share.held("namespace:team-a") == 0 and len(share) == 0 and share.in_progress == 0


async def test_share_is_released_when_the_call_is_cancelled() -> None:
    as_principal("team-a")
    interceptor = QuotaInterceptor(quotas(max_concurrent_per_caller=1, read_rate=0.0), Clock())
    share = interceptor.state.share
    assert share is not None
    blocked = Handler(gate=asyncio.Event())
    (held,) = await start_held(interceptor, 1, blocked)
    assert share.held("namespace:team-a") == 1
    held.cancel()  # what grpc.aio does to the handler when the client cancels or the deadline passes
    with pytest.raises(asyncio.CancelledError):
        await held
    assert share.held("namespace:team-a") == 0 and share.in_progress == 0
    assert await call(interceptor, POLL_METHOD, pb.PollTaskRequest(), Handler()) == "ok"


def test_quotas_come_from_the_config() -> None:
    cfg = Config(schedule_rate_per_namespace=7.0, schedule_burst=8.0, poll_rate_per_namespace=9.0, poll_burst=10.0,
                 namespace_max_concurrent_rpcs=3, task_service_max_concurrent_rpcs=12, list_page_max=500)  # fmt: skip
    assert Quotas.from_config(cfg) == Quotas(7.0, 8.0, 9.0, 10.0, 3, 12, 500)
    state = QuotaInterceptor(Quotas.from_config(cfg.with_overrides(namespace_max_concurrent_rpcs=0))).state
    assert state.share is not None and (state.share.per_key, state.share.total) == (0, 12)
    assert set(state.limiters) == {"write", "read"}
    assert rate_limit.transport_cap(cfg) == 48  # gRPC's backstop, above the cap counted after the quotas
    defaults = Config()
    assert defaults.namespace_max_concurrent_rpcs * 4 == defaults.task_service_max_concurrent_rpcs


def test_config_fields_are_settable_from_the_environment() -> None:
    cfg = Config.from_env({"LEASESCHED_POLL_RATE_PER_NAMESPACE": "12.5", "LEASESCHED_POLL_BURST": "30",
                           "LEASESCHED_NAMESPACE_MAX_CONCURRENT_RPCS": "5"})  # fmt: skip
    assert (cfg.poll_rate_per_namespace, cfg.poll_burst, cfg.namespace_max_concurrent_rpcs) == (12.5, 30.0, 5)
