"""Concurrency limit definitions against real Cassandra (docs/concurrency.md):
the store's conditional writes (create IF NOT EXISTS, change and delete IF
version, delete IF EXISTS, listing by namespace and over the whole table) and
LimitService served by a real TaskService process, called with the client.
The same logic runs over the in-memory store in tests/unit/test_limit_service.py;
roles and namespace isolation with real tokens are in test_auth.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from leasesched.client import AlreadyExistsError, Client, FailedPreconditionError, InvalidArgumentError, LimitScope, NotFoundError
from leasesched.concurrency import ConcurrencyLimit
from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore
from leasesched.testing import RunningProcess
from leasesched.v1 import scheduler_pb2 as pb
from leasesched.v1 import scheduler_pb2_grpc as pb_grpc

TYPE, KEY, NS = LimitScope.TYPE, LimitScope.KEY, LimitScope.NAMESPACE


def test_the_cassandra_store_keeps_the_conditions(module_config: Config) -> None:
    async def run() -> None:
        store = CassandraStore(module_config)
        await store.connect()
        try:
            limit = ConcurrencyLimit("store-a", TYPE, "export", 3, 1, 10, 10)
            assert await store.insert_limit(limit)
            assert not await store.insert_limit(ConcurrencyLimit("store-a", TYPE, "export", 9, 1, 11, 11))
            assert await store.get_limit("store-a", TYPE, "export") == limit
            assert await store.get_limit("store-a", KEY, "export") is None  # another scope, another limit
            assert not await store.update_limit(ConcurrencyLimit("store-a", TYPE, "export", 4, 3, 0, 20), 2)
            assert await store.update_limit(ConcurrencyLimit("store-a", TYPE, "export", 4, 2, 0, 20), 1)
            assert await store.get_limit("store-a", TYPE, "export") == ConcurrencyLimit("store-a", TYPE, "export", 4, 2, 10, 20)
            assert not await store.update_limit(ConcurrencyLimit("store-a", TYPE, "nope", 4, 2, 0, 20), 1)
            assert await store.get_limit("store-a", TYPE, "nope") is None  # a failed update creates no row
            assert not await store.delete_limit("store-a", TYPE, "export", 1)
            assert await store.delete_limit("store-a", TYPE, "export", 2)
            assert not await store.delete_limit("store-a", TYPE, "export", 0)
            for ns, scope, name in [("store-b", KEY, "*"), ("store-a", NS, ""), ("store-a", KEY, "p1"), ("store-c", TYPE, "t")]:
                assert await store.insert_limit(ConcurrencyLimit(ns, scope, name, 2))
            assert await store.delete_limit("store-c", TYPE, "t", 0)  # 0: whatever version
            listed = [(v.namespace, v.scope, v.name) for v in await store.list_limits("store-a")]
            assert listed == [("store-a", KEY, "p1"), ("store-a", NS, "")]
            everything = [(v.namespace, v.scope, v.name) for v in await store.list_limits(None)]
            assert [k for k in everything if k[0].startswith("store-")] == [("store-a", KEY, "p1"), ("store-a", NS, ""), ("store-b", KEY, "*")]
        finally:
            await store.close()

    asyncio.run(run())


@pytest.fixture
def client(task_service: RunningProcess, module_config: Config) -> Iterator[Client]:
    assert task_service.target is not None
    with Client(task_service.target, config=module_config, namespace="svc") as c:
        yield c


def test_limit_service_on_a_real_task_service(client: Client, task_service: RunningProcess) -> None:
    made = client.set_limit(KEY, "*", 2)
    assert (made.namespace, made.scope, made.name, made.max_running, made.version) == ("svc", KEY, "*", 2, 1)
    with pytest.raises(AlreadyExistsError):
        client.set_limit(KEY, "*", 3, create_or_update=False)
    changed = client.set_limit(KEY, "*", 3)
    assert (changed.max_running, changed.version, changed.created_at) == (3, 2, made.created_at)
    with pytest.raises(FailedPreconditionError, match="version 2"):
        client.set_limit(KEY, "*", 4, expected_version=1)
    assert client.get_limit(KEY, "*").max_running == 3  # nothing changed
    for name in ("a", "b", "c"):
        client.set_limit(TYPE, name, 1)
    client.set_limit(NS, "", 20)
    assert [i.label() for i in client.list_limits(page_size=2)] == ["svc/key=*", "svc", "svc/type=a", "svc/type=b", "svc/type=c"]
    with pytest.raises(InvalidArgumentError, match="limit.namespace"):
        client.get_limit(KEY, "*", namespace="bad ns")
    with pytest.raises(FailedPreconditionError):
        client.delete_limit(TYPE, "a", expected_version=9)
    client.delete_limit(TYPE, "a", expected_version=1)
    with pytest.raises(NotFoundError):
        client.get_limit(TYPE, "a")
    # Every refusal is INVALID_ARGUMENT naming the field, over the wire too.
    assert task_service.target is not None
    with grpc.insecure_channel(task_service.target) as channel:
        stub = pb_grpc.LimitServiceStub(channel)
        for request, field in [
            (pb.SetLimitRequest(limit=pb.LimitRef(namespace="svc", scope=pb.LIMIT_SCOPE_KEY, name="*"), max_running=1001), "max_running"),
            (pb.SetLimitRequest(limit=pb.LimitRef(namespace="svc", name="*"), max_running=1), "limit.scope"),
            (pb.SetLimitRequest(limit=pb.LimitRef(namespace="svc", scope=pb.LIMIT_SCOPE_NAMESPACE, name="x"), max_running=1), "limit.name"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.SetLimit(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
