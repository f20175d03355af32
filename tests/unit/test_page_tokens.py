"""Signed ListTasks page tokens (services/page_tokens.py) and the store's strict
cursor decoding (leasesched/store/page_token.py)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from leasesched import limits
from leasesched.errors import InvalidArgument
from leasesched.store.page_token import BadPageToken, decode_token, encode_token
from services.page_tokens import PageTokens

KEY = b"k" * 32
CURSOR = encode_token(20_000, 20_000 * 86_400_000 + 5, uuid.uuid4())


def test_round_trip_and_last_page() -> None:
    tokens = PageTokens(KEY)
    token = tokens.sign(CURSOR, "ns", 0)
    assert token.startswith("v1.") and len(token) <= limits.MAX_PAGE_TOKEN
    assert tokens.verify(token, "ns", 0) == CURSOR
    assert tokens.sign("", "ns", 0) == "" and tokens.verify("", "ns", 0) == ""


@pytest.mark.parametrize(
    "namespace,status,key",
    [("other", 0, KEY), ("ns", 1, KEY), ("ns", 0, b"x" * 32)],
    ids=["another namespace", "another status filter", "another server key"],
)
def test_a_token_is_bound_to_its_query_and_key(namespace: str, status: int, key: bytes) -> None:
    token = PageTokens(KEY).sign(CURSOR, "ns", 0)
    with pytest.raises(InvalidArgument, match="page_token is not a token this server issued"):
        PageTokens(key).verify(token, namespace, status)


def _flip(token: str, index: int) -> str:
    return token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1 :]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: _flip(t, 5),  # the cursor edited
        lambda t: _flip(t, len(t) - 3),  # the mac edited
        lambda t: t[:-4],
        lambda t: "v2" + t[2:],
        lambda t: t.replace(".", "", 1),
        lambda t: t + "\n",
        lambda t: t + "=" * 600,
        lambda t: "garbage!",
    ],
)
def test_edited_tokens_are_refused(mangle: Any) -> None:
    tokens = PageTokens(KEY)
    with pytest.raises(InvalidArgument, match="page_token"):
        tokens.verify(mangle(tokens.sign(CURSOR, "ns", 0)), "ns", 0)


def _raw(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


@pytest.mark.parametrize(
    "body",
    [
        {"d": 1e308, "c": None, "t": None},
        {"d": float("inf"), "c": None, "t": None},
        {"d": True, "c": None, "t": None},
        {"d": -1, "c": None, "t": None},
        {"d": 10**9, "c": None, "t": None},
        {"d": 20_000, "c": 2**63, "t": str(uuid.UUID(int=1))},
        {"d": 20_000, "c": 5, "t": str(uuid.UUID(int=1))},  # a time outside its day
        {"d": 20_000, "c": 20_000 * 86_400_000, "t": None},  # half a position
        {"d": 20_000, "c": None, "t": None, "x": 1},
        [1, 2, 3],
    ],
)
def test_the_store_cursor_is_decoded_strictly(body: object) -> None:
    with pytest.raises(BadPageToken):
        decode_token(_raw(body))


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        PageTokens(b"short")
