"""Where a ListTasks page stopped: the Cassandra store's cursor.

This is the store's own position (a day partition and the last row read),
not what clients see: TaskService signs it (``services/page_tokens.py``), so a
cursor reaching the store was made by a server. It is still decoded strictly
and bounded — types exact, the day within what ListTasks walks, the row time
inside its day — so that even a leaked signing key cannot make the store walk
far-away partitions or overflow a column.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass

DAY_MS = 86_400_000
MAX_DAY = 2_932_896  # 9999-12-31: no stored time lies past it


class BadPageToken(ValueError):
    pass


@dataclass(frozen=True)
class Cursor:
    day: int
    created_at: int | None
    task_id: uuid.UUID | None


def encode_token(day: int, created_at: int | None, task_id: uuid.UUID | None) -> str:
    body = {"d": day, "c": created_at, "t": str(task_id) if task_id else None}
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()


def _int(value: object, low: int, high: int) -> int:
    # bool is an int in Python; a float (1e308, inf) is not a position.
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in {low}..{high}")
    return value


def decode_token(token: str) -> Cursor | None:
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(body, dict) or set(body) != {"d", "c", "t"}:
            raise ValueError("unexpected fields")
        day = _int(body["d"], 0, MAX_DAY)
        created_at = None
        if body["c"] is not None:
            created_at = _int(body["c"], day * DAY_MS, (day + 1) * DAY_MS - 1)
        task_id = uuid.UUID(body["t"]) if body["t"] is not None else None
        if (created_at is None) != (task_id is None):
            raise ValueError("created_at and task_id come together")
        return Cursor(day=day, created_at=created_at, task_id=task_id)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise BadPageToken("page_token is not a token this server issued") from exc
