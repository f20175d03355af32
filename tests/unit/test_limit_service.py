"""LimitService (docs/concurrency.md) over the in-memory store: every bad
field is refused naming it, create / exists / stale version / delete, paged
listing, who may call what, and the memory store's conditions (the same as the
Cassandra store's; tests/integration/test_limit_service.py runs the service
against real Cassandra)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from leasesched import concurrency
from leasesched.auth import Principal, current_principal
from leasesched.concurrency import ConcurrencyLimit, LimitScope
from leasesched.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from leasesched.server.auth_interceptor import roles_for
from leasesched.store.memory import MemoryStore
from leasesched.v1 import scheduler_pb2 as pb
from services.limit_service import LimitService

NS, TYPE, KEY = pb.LIMIT_SCOPE_NAMESPACE, pb.LIMIT_SCOPE_TYPE, pb.LIMIT_SCOPE_KEY


def ref(namespace: str = "ns", scope: int = KEY, name: str = "*") -> pb.LimitRef:
    return pb.LimitRef(namespace=namespace, scope=scope, name=name)  # type: ignore[arg-type]


def set_request(r: pb.LimitRef | None = None, max_running: int = 3, **kw: Any) -> pb.SetLimitRequest:
    return pb.SetLimitRequest(limit=r or ref(), max_running=max_running, **kw)


@pytest.fixture
def service(store: MemoryStore) -> Any:
    """Typed as Any: the handlers are called without a gRPC context."""
    return LimitService(store)


@pytest.fixture
def as_client() -> Iterator[None]:
    """Calls made as a client token of namespace 'ns'."""
    token = current_principal.set(Principal("t1", "ns", "client"))
    try:
        yield
    finally:
        current_principal.reset(token)


# ------------------------------------------------------------------ validation


BAD_REFS = [
    (ref(namespace=""), "limit.namespace"),
    (ref(namespace="bad ns"), "limit.namespace"),
    (ref(namespace="x" * 65), "limit.namespace"),
    (ref(scope=pb.LIMIT_SCOPE_UNSPECIFIED), "limit.scope"),
    (ref(scope=99), "limit.scope"),
    (ref(scope=NS, name="export"), "limit.name"),
    (ref(scope=TYPE, name=""), "limit.name"),
    (ref(scope=TYPE, name="1starts-with-a-digit"), "limit.name"),
    (ref(scope=TYPE, name="export\n"), "limit.name"),
    (ref(scope=KEY, name=""), "limit.name"),
    (ref(scope=KEY, name="has space"), "limit.name"),
    (ref(scope=KEY, name="k" * 65), "limit.name"),
    (ref(scope=KEY, name="**"), "limit.name"),
]


@pytest.mark.parametrize("bad,field", BAD_REFS)
async def test_every_rpc_refuses_a_bad_ref_naming_the_field(service: Any, bad: pb.LimitRef, field: str) -> None:
    for call in (
        service.SetLimit(set_request(bad), None),
        service.GetLimit(pb.GetLimitRequest(limit=bad), None),
        service.DeleteLimit(pb.DeleteLimitRequest(limit=bad), None),
    ):
        with pytest.raises(InvalidArgument, match=rf"^{field}\b"):
            await call


@pytest.mark.parametrize("value", [0, -1, concurrency.MAX_RUNNING + 1, 2**31 - 1])
async def test_max_running_out_of_range_is_refused_naming_it(service: Any, store: MemoryStore, value: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"^max_running {value} is out of range 1\.\.{concurrency.MAX_RUNNING}"):
        await service.SetLimit(set_request(max_running=value), None)
    assert store.limits == {}


async def test_negative_versions_and_page_sizes_are_refused_naming_the_field(service: Any) -> None:
    with pytest.raises(InvalidArgument, match="^expected_version"):
        await service.SetLimit(set_request(expected_version=-1), None)
    with pytest.raises(InvalidArgument, match="^expected_version"):
        await service.DeleteLimit(pb.DeleteLimitRequest(limit=ref(), expected_version=-1), None)
    with pytest.raises(InvalidArgument, match="^page_size"):
        await service.ListLimits(pb.ListLimitsRequest(namespace="ns", page_size=-1), None)
    with pytest.raises(InvalidArgument, match="^namespace"):
        await service.ListLimits(pb.ListLimitsRequest(namespace="bad ns"), None)


@pytest.mark.parametrize("token", ["nope", "!!", base64.urlsafe_b64encode(b'["ns", "bogus", "x"]').decode(),
                                   base64.urlsafe_b64encode(b'["other", "key", "x"]').decode(), "A" * 600])  # fmt: skip
async def test_a_page_token_the_server_did_not_issue_is_refused(service: Any, token: str) -> None:
    with pytest.raises(InvalidArgument, match="^page_token"):
        await service.ListLimits(pb.ListLimitsRequest(namespace="ns", page_token=token), None)


async def test_the_extremes_that_are_valid_are_accepted(service: Any) -> None:
    for r, most in [(ref(scope=NS, name=""), 1), (ref(scope=TYPE, name="a" * 128), concurrency.MAX_RUNNING),
                    (ref(scope=KEY, name="p" * 64), 7), (ref(scope=KEY, name="*"), 2)]:  # fmt: skip
        view = (await service.SetLimit(set_request(r, most), None)).limit
        assert (view.limit, view.max_running, view.version, view.running) == (r, most, 1, 0)


# ------------------------------------------------------------------ create, change, delete


async def test_create_exists_change_stale_version_and_delete(service: Any, store: MemoryStore) -> None:
    r = ref(scope=TYPE, name="export")
    made = (await service.SetLimit(set_request(r, 4), None)).limit
    assert (made.max_running, made.version) == (4, 1) and made.created_at == made.updated_at
    assert await store.get_limit("ns", LimitScope.TYPE, "export") == ConcurrencyLimit(
        "ns", LimitScope.TYPE, "export", 4, 1, made.created_at.ToMilliseconds(), made.updated_at.ToMilliseconds()
    )
    with pytest.raises(AlreadyExists, match="ns/type=export"):
        await service.SetLimit(set_request(r, 5), None)
    with pytest.raises(FailedPrecondition, match="version 1, not expected_version 7"):
        await service.SetLimit(set_request(r, 5, expected_version=7), None)
    assert (await store.get_limit("ns", LimitScope.TYPE, "export")).max_running == 4  # type: ignore[union-attr]
    changed = (await service.SetLimit(set_request(r, 5, expected_version=1), None)).limit
    assert (changed.max_running, changed.version, changed.created_at) == (5, 2, made.created_at)
    upserted = (await service.SetLimit(set_request(r, 6, create_or_update=True), None)).limit
    assert (upserted.max_running, upserted.version) == (6, 3)
    assert (await service.GetLimit(pb.GetLimitRequest(limit=r), None)).limit == upserted
    with pytest.raises(FailedPrecondition, match="version 3"):
        await service.DeleteLimit(pb.DeleteLimitRequest(limit=r, expected_version=2), None)
    assert await store.get_limit("ns", LimitScope.TYPE, "export") is not None
    await service.DeleteLimit(pb.DeleteLimitRequest(limit=r, expected_version=3), None)
    with pytest.raises(NotFound, match="ns/type=export"):
        await service.GetLimit(pb.GetLimitRequest(limit=r), None)
    with pytest.raises(NotFound):
        await service.DeleteLimit(pb.DeleteLimitRequest(limit=r), None)
    with pytest.raises(NotFound):
        await service.SetLimit(set_request(r, 5, expected_version=3), None)
    made_again = (await service.SetLimit(set_request(r, 2, create_or_update=True), None)).limit
    assert made_again.version == 1


async def test_the_three_scopes_and_the_default_key_are_separate_limits(service: Any, store: MemoryStore) -> None:
    for r, most in [(ref(scope=NS, name=""), 10), (ref(scope=TYPE, name="p1"), 4), (ref(scope=KEY, name="*"), 2),
                    (ref(scope=KEY, name="p1"), 1)]:  # fmt: skip
        await service.SetLimit(set_request(r, most), None)
    table = concurrency.index_limits(await store.list_limits("ns"))
    groups = concurrency.groups_for("ns", "p1", "p1", table)
    assert [(g.label(), g.max_running) for g in groups] == [("ns", 10), ("ns/type=p1", 4), ("ns/key=p1", 1)]
    assert [g.max_running for g in concurrency.groups_for("ns", "other", "p2", table)] == [10, 2]


async def test_a_change_lost_to_a_race_is_decided_again(service: Any, store: MemoryStore) -> None:
    await service.SetLimit(set_request(max_running=3), None)
    real_update = store.update_limit
    raced: list[bool] = []

    async def racing_update(limit: ConcurrencyLimit, expected_version: int) -> bool:
        if not raced:  # another admin's change lands first
            raced.append(True)
            stored = store.limits[("ns", LimitScope.KEY, "*")]
            assert await real_update(ConcurrencyLimit("ns", LimitScope.KEY, "*", 9, stored.version + 1), stored.version)
        return await real_update(limit, expected_version)

    store.update_limit = racing_update  # type: ignore[method-assign]
    with pytest.raises(FailedPrecondition, match="version 2, not expected_version 1"):
        await service.SetLimit(set_request(max_running=5, expected_version=1), None)
    raced.clear()
    view = (await service.SetLimit(set_request(max_running=5, create_or_update=True), None)).limit
    assert (view.max_running, view.version) == (5, 4)  # 2 by the race, 3 by the second race, 4 ours


async def test_the_store_being_unavailable_is_unavailable(service: Any, store: MemoryStore) -> None:
    for op, call in [
        ("insert_limit", service.SetLimit(set_request(), None)),
        ("get_limit", service.GetLimit(pb.GetLimitRequest(limit=ref()), None)),
        ("list_limits", service.ListLimits(pb.ListLimitsRequest(namespace="ns"), None)),
        ("delete_limit", service.DeleteLimit(pb.DeleteLimitRequest(limit=ref()), None)),
    ]:
        store.fail_next.add(op)
        with pytest.raises(Unavailable, match="injected"):
            await call


# ------------------------------------------------------------------ listing


async def test_list_pages_through_one_namespace_in_order(service: Any) -> None:
    names = [f"t{i:02d}" for i in range(7)]
    for name in names:
        await service.SetLimit(set_request(ref(scope=TYPE, name=name)), None)
    await service.SetLimit(set_request(ref(scope=NS, name="")), None)
    await service.SetLimit(set_request(ref(namespace="other", scope=KEY, name="*")), None)
    seen: list[tuple[str, int, str]] = []
    token = ""
    pages = 0
    while True:
        reply = await service.ListLimits(pb.ListLimitsRequest(namespace="ns", page_size=3, page_token=token), None)
        assert len(reply.limits) <= 3
        seen += [(v.limit.namespace, v.limit.scope, v.limit.name) for v in reply.limits]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    # By scope text ('namespace' < 'type'), then name; the other namespace not at all.
    assert seen == [("ns", NS, "")] + [("ns", TYPE, n) for n in names]
    assert pages == 3
    everything = await service.ListLimits(pb.ListLimitsRequest(), None)  # auth off: every namespace
    assert [v.limit.namespace for v in everything.limits] == ["ns"] * 8 + ["other"]
    with pytest.raises(InvalidArgument, match="page_token"):  # a token of one namespace is not one of another
        first = await service.ListLimits(pb.ListLimitsRequest(namespace="ns", page_size=1), None)
        await service.ListLimits(pb.ListLimitsRequest(namespace="other", page_token=first.next_page_token), None)


# ------------------------------------------------------------------ who may call what


def test_reads_are_for_clients_operators_and_admins_changes_for_admins() -> None:
    prefix = "/leasesched.v1.LimitService/"
    assert roles_for(prefix + "GetLimit") == roles_for(prefix + "ListLimits") == {"client", "operator", "admin"}
    assert roles_for(prefix + "SetLimit") == roles_for(prefix + "DeleteLimit") == {"admin"}


@pytest.mark.usefixtures("as_client")
async def test_a_client_reads_only_its_own_namespace(service: Any, store: MemoryStore) -> None:
    await store.insert_limit(ConcurrencyLimit("ns", LimitScope.KEY, "*", 2))
    await store.insert_limit(ConcurrencyLimit("other", LimitScope.KEY, "*", 2))
    assert (await service.GetLimit(pb.GetLimitRequest(limit=ref()), None)).limit.max_running == 2
    assert len((await service.ListLimits(pb.ListLimitsRequest(namespace="ns"), None)).limits) == 1
    with pytest.raises(PermissionDenied):
        await service.GetLimit(pb.GetLimitRequest(limit=ref(namespace="other")), None)
    with pytest.raises(PermissionDenied):
        await service.ListLimits(pb.ListLimitsRequest(namespace="other"), None)
    with pytest.raises(PermissionDenied):  # every namespace: admin only
        await service.ListLimits(pb.ListLimitsRequest(), None)
    with pytest.raises(PermissionDenied):
        await service.SetLimit(set_request(ref(namespace="other")), None)


# ------------------------------------------------------------------ the memory store's conditions


async def test_memory_store_conditions(store: MemoryStore) -> None:
    limit = ConcurrencyLimit("ns", LimitScope.TYPE, "t", 3, 1, 10, 10)
    assert await store.insert_limit(limit) and not await store.insert_limit(limit)
    assert not await store.update_limit(ConcurrencyLimit("ns", LimitScope.TYPE, "t", 4, 3, 0, 20), 2)
    assert await store.update_limit(ConcurrencyLimit("ns", LimitScope.TYPE, "t", 4, 2, 0, 20), 1)
    assert await store.get_limit("ns", LimitScope.TYPE, "t") == ConcurrencyLimit("ns", LimitScope.TYPE, "t", 4, 2, 10, 20)
    assert not await store.update_limit(ConcurrencyLimit("ns", LimitScope.TYPE, "u", 4, 2, 0, 20), 1)  # none
    assert not await store.delete_limit("ns", LimitScope.TYPE, "t", 1)
    assert await store.delete_limit("ns", LimitScope.TYPE, "t", 0)
    assert not await store.delete_limit("ns", LimitScope.TYPE, "t", 0)
    assert await store.list_limits(None) == []
