"""TriggerService input checks without a cluster: each bound of a Hello, a
stream message and a due hint, and that a refused message changes nothing.
(tests/integration/test_hostile_input.py throws generated input at a real
trigger; these pin the individual rules and run in milliseconds.)"""

from __future__ import annotations

import uuid

import pytest

from leasesched import limits
from leasesched.errors import InvalidArgument
from leasesched.v1 import scheduler_pb2 as pb
from trigger.dispatcher import Dispatcher
from trigger.service import TriggerService, check_hello, check_notify_due


def hello(**changes: object) -> pb.Hello:
    fields: dict[str, object] = {"worker_id": "w-1", "namespace": "ns", "task_types": ["t"], "capacity": 2}
    fields.update(changes)
    return pb.Hello(**fields)  # type: ignore[arg-type]


def test_a_good_hello() -> None:
    assert check_hello(hello()) == ("ns", frozenset({"t"}))


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": "w\n"}, "worker_id"),
        ({"worker_id": "w 1"}, "worker_id"),
        ({"worker_id": "w" * (limits.MAX_WORKER_ID + 1)}, "worker_id"),
        ({"namespace": ""}, "namespace"),
        ({"namespace": "ns\n"}, "namespace"),
        ({"task_types": []}, "task_types"),
        ({"task_types": ["t"] * (limits.SUBSCRIBE_TASK_TYPES.high + 1)}, "task_types"),
        ({"task_types": ["t\n"]}, "task_types"),
        ({"capacity": -1}, "capacity"),
        ({"capacity": limits.WORKER_SLOTS.high + 1}, "capacity"),
    ],
)
def test_bad_hellos_name_the_field(changes: dict[str, object], word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        check_hello(hello(**changes))


def hint(**changes: object) -> pb.NotifyDueRequest:
    fields: dict[str, object] = {"task_id": str(uuid.uuid4()), "shard": 3, "attempt": 1, "lease_token": 0, "priority": 5, "type": "t", "namespace": "ns"}
    fields.update(changes)
    return pb.NotifyDueRequest(**fields)  # type: ignore[arg-type]


def test_good_hints() -> None:
    check_notify_due(hint(), 64)
    check_notify_due(hint(concurrency_key="partner-7"), 64)
    check_notify_due(pb.NotifyDueRequest(task_id=str(uuid.uuid4()), shard=0), 64)  # a bare hint: the trigger reads the row
    at = hint()
    at.run_at.FromMilliseconds(limits.MAX_STORED_TIME_MS)
    check_notify_due(at, 64)


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"task_id": "x"}, "task_id"),
        ({"shard": -1}, "shard"),
        ({"shard": 64}, "shard"),
        ({"attempt": -1}, "attempt"),
        ({"attempt": limits.CLAIM_ATTEMPT.high + 1}, "attempt"),
        ({"lease_token": -1}, "lease_token"),
        ({"priority": 10}, "priority"),
        ({"type": ""}, "type"),  # required with an attempt
        ({"type": "t\n"}, "type"),
        ({"namespace": "ns\n"}, "namespace"),
        ({"concurrency_key": "a b"}, "concurrency_key"),
    ],
)
def test_bad_hints_name_the_field(changes: dict[str, object], word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        check_notify_due(hint(**changes), 64)


@pytest.mark.parametrize("seconds, nanos", [(10**12, 0), (-1, 0), (253402300800, 0), (0, -1), (0, 10**9)])
def test_run_at_outside_a_storable_time(seconds: int, nanos: int) -> None:
    request = hint()
    request.run_at.seconds, request.run_at.nanos = seconds, nanos
    with pytest.raises(InvalidArgument, match="run_at"):
        check_notify_due(request, 64)


async def _never(_: object) -> bool:
    return False


@pytest.mark.parametrize(
    "message, word",
    [
        (pb.WorkerMessage(credit=pb.Credit(slots=-1)), "slots"),
        (pb.WorkerMessage(returned=pb.Returned(task_ids=[str(uuid.uuid4()), "nope"])), "task_ids"),
        (pb.WorkerMessage(returned=pb.Returned(task_ids=[str(uuid.uuid4())] * (limits.TASK_IDS_PER_MESSAGE.high + 1))), "task_ids"),
        (pb.WorkerMessage(settled=pb.Settled(claimed=[pb.TaskRef(task_id=str(uuid.uuid4()), attempt=-1)])), "attempt"),
        (pb.WorkerMessage(settled=pb.Settled(finished=[pb.TaskRef(task_id=str(uuid.uuid4()), lease_token=-1)])), "lease_token"),
        (pb.WorkerMessage(hello=hello()), "Hello"),
    ],
)
async def test_a_bad_stream_message_is_refused_whole(message: pb.WorkerMessage, word: str) -> None:
    dispatcher = Dispatcher(5.0, _never)
    service = TriggerService(dispatcher, lambda _: None)
    link = dispatcher.connect("w-1", "ns", frozenset({"t"}), 3)
    with pytest.raises(InvalidArgument, match=word):
        service._apply(message, link)
    assert link.credits == 3


async def test_an_empty_message_is_ignored() -> None:
    dispatcher = Dispatcher(5.0, _never)
    service = TriggerService(dispatcher, lambda _: None)
    link = dispatcher.connect("w-1", "ns", frozenset({"t"}), 3)
    service._apply(pb.WorkerMessage(), link)
    service._apply(pb.WorkerMessage(credit=pb.Credit(slots=limits.WORKER_SLOTS.high)), link)
    assert link.credits == limits.WORKER_SLOTS.high
