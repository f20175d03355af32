"""Opaque ListTasks page tokens: where the previous page stopped.

The token is base64 of a small JSON object, so it survives any transport and
a forged or truncated one is rejected with a clear message instead of a crash.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass


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


def decode_token(token: str) -> Cursor | None:
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        task_id = uuid.UUID(body["t"]) if body["t"] else None
        created_at = int(body["c"]) if body["c"] is not None else None
        return Cursor(day=int(body["d"]), created_at=created_at, task_id=task_id)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadPageToken("page_token is not a token this server issued") from exc
