"""ListTasks page tokens that cannot be forged: the store's cursor, signed.

A token is ``v1.<cursor>.<mac>``: the store's cursor (opaque here) and an
HMAC-SHA256 over it *and the query it belongs to* (namespace, status filter,
and the type and time-range filters: ``filters``),
keyed by a secret every TaskService replica shares (kept in the store, made
once by whichever replica needs it first). So a client can hand back only a
token a server gave it, for the same namespace and filter; anything else —
edited, truncated, from another namespace, from a foreign key — is refused
with INVALID_ARGUMENT before the store sees it. Before signing, a forged
cursor could make a server walk 200,000 empty day partitions or overflow a
timestamp column.

Tokens do not expire: a cursor's position stays meaningful, and the store
stops at the oldest day it lists anyway. Rotating the secret (deleting its
row) invalidates every outstanding token; clients then list from the start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from leasesched import limits
from leasesched.errors import InvalidArgument

VERSION = "v1"
MAC_BYTES = 16  # 128 bits: forging one takes 2^128 tries


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page-token secret must have at least 128 bits")
        self._secret = secret

    def _mac(self, cursor: bytes, namespace: str, status: int, filters: str) -> bytes:
        parts = [VERSION.encode(), namespace.encode(), str(status).encode(), cursor]
        if filters:
            # Only when set: a token issued before these filters existed (and
            # any token of an unfiltered listing) keeps its MAC.
            parts.append(filters.encode())
        return hmac.new(self._secret, b"\x00".join(parts), hashlib.sha256).digest()[:MAC_BYTES]

    def sign(self, cursor: str, namespace: str, status: int, filters: str = "") -> str:
        """The token for the store cursor ``cursor`` ("" → "": the last page).
        ``filters``: the other filters, as one canonical string (``list_filters``)."""
        if not cursor:
            return ""
        raw = cursor.encode()
        token = f"{VERSION}.{_b64(raw)}.{_b64(self._mac(raw, namespace, status, filters))}"
        if len(token) > limits.MAX_PAGE_TOKEN:
            raise ValueError(f"a page token of {len(token)} characters; the limit is {limits.MAX_PAGE_TOKEN}")
        return token

    def verify(self, token: str, namespace: str, status: int, filters: str = "") -> str:
        """The store cursor inside ``token`` if a server issued it for this
        namespace and status filter; "" for no token (the first page)."""
        if not token:
            return ""
        refused = InvalidArgument(
            f"page_token is not a token this server issued for namespace {namespace!r} and these filters "
            "(status, type, created_after, created_before); "
            "list again from the start (empty page_token)"
        )
        if len(token) > limits.MAX_PAGE_TOKEN:
            raise InvalidArgument(f"page_token is {len(token)} characters, over the limit of {limits.MAX_PAGE_TOKEN}")
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != VERSION or not body or not mac:
            raise refused
        try:
            raw, given = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            raise refused from None
        if not hmac.compare_digest(given, self._mac(raw, namespace, status, filters)):
            raise refused
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise refused from None


def list_filters(task_type: str, created_after: int | None, created_before: int | None) -> str:
    """The type and time-range filters as one string for the MAC ("" when
    none is set). A type name cannot hold a '|' (``limits.TYPE_RE``)."""
    if not task_type and created_after is None and created_before is None:
        return ""
    return f"type={task_type}|after={'' if created_after is None else created_after}|before={'' if created_before is None else created_before}"
