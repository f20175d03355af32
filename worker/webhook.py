"""Webhook tasks: a built-in handler that POSTs a task's data to a URL, signed per Standard Webhooks.

A worker started with ``leasesched worker --webhook`` serves task type
``webhook`` (``WEBHOOK_TYPE``) beside its own handlers. The task's payload is
JSON::

    {"url": "https://hooks.example.com/in", "event_type": "invoice.paid", "data": {...}}

and the receiver gets ``{"type": event_type, "timestamp": ..., "data": data}``
with the three Standard Webhooks headers. docs/webhooks.md is the user's
side of this; the decisions and their reasons are here.

* **Identity.** ``webhook-id`` is the task id: the same on every attempt, so a
  receiver drops a delivery it already processed (an attempt whose 2xx was
  lost, or that ran again after its worker died, sends it again).
  ``webhook-timestamp`` is this attempt's send time (receivers reject old
  ones: a replay window), so the signature differs per attempt.
* **The secret** is the namespace's: a worker serves exactly one namespace,
  so it is the worker's configuration (``Config.webhook_secret`` or
  ``--webhook-secret-file``), checked at start (``WebhookSettings``); a worker
  asked to serve webhooks without one does not start.
* **Outcomes.** 2xx succeeds (the result: status and the body's first
  ``RESULT_BODY_BYTES``). 408, 429, 5xx, timeouts and connection errors are
  retried per the task's retry policy; a ``Retry-After`` (seconds or an HTTP
  date) on those answers becomes ``RetryAfter``, so the next attempt does not
  start before it. Redirects are not followed (a 3xx is a permanent failure:
  following one would send the signed body to an address nobody checked
  against the allow-list); other 4xx are permanent.
* **Outbound addresses.** The host is resolved here, every address it resolves
  to must be public (or inside ``WebhookSettings.allow``), and the request is
  sent to the checked address itself, with the original Host header and TLS
  server name (certificates are verified against the host name). So a DNS
  answer that changes between the check and the connection (DNS rebinding)
  cannot move the request to an address that was not checked. Proxies from
  the environment are ignored (``trust_env=False``) for the same reason.
* **Time.** One delivery (resolve, connect, send, answer) is bounded by
  ``WebhookSettings.timeout_s``, and by 0.9 × the task's start_to_close when
  that is shorter, so that the handler reports its own timeout before the
  worker stops it.

Gates (issue 15, docs/gates.md): a 429 or 503 with a Retry-After becomes
``RateLimited``: the task's gate closes until then, so the gate's other tasks
wait too, and the task runs again then without using an attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import ipaddress
import json
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
from standardwebhooks import Webhook

from leasesched.config import Config
from worker.handlers import Handlers, Mode, PermanentError, RateLimited, RetryAfter, TaskContext

WEBHOOK_TYPE = "webhook"
DEFAULT_EVENT_TYPE = "leasesched.webhook"
PAYLOAD_FIELDS = frozenset({"url", "event_type", "data"})
MAX_URL = 2048  # characters; what browsers and most servers accept
EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,255}")  # "invoice.paid", "user:created"
RESULT_BODY_BYTES = 256  # of a 2xx answer's body, kept as the task's result; the rest is not even read
ERROR_BODY_CHARS = 200  # of a failed answer's body, in the error text
MIN_SECRET_BYTES = 24  # Standard Webhooks: keys of 24 to 64 random bytes
MAX_RETRY_AFTER_S = 10**9  # a Retry-After past this is nonsense; RetryAfter cuts it further (limits.RETRY_INTERVAL)
USER_AGENT = "leasesched-webhook/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> every address the host resolves to (tests pass their own)
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class WebhookFailed(Exception):
    """A delivery that may succeed if tried again (timeout, connection refused, 5xx without Retry-After).

    ``error_type`` is what the task records, e.g. ``HTTP503`` or ``Timeout``:
    a task may name it in ``non_retryable_error_types`` to fail at once."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# ---------------------------------------------------------------- settings


def decode_secret(secret: str) -> bytes:
    """The key of ``whsec_<base64>`` (the prefix is optional), at least ``MIN_SECRET_BYTES``.

    Strict base64: the signing library skips characters that are not base64,
    so a mistyped secret would sign with another key than the receiver's.
    Messages never show the secret."""
    raw = secret.strip().removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the webhook secret is not whsec_<base64>") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the webhook secret is {len(key)} bytes; at least {MIN_SECRET_BYTES} random bytes are needed")
    return key


def parse_allow(text: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.1/32, 10.0.0.0/8"`` → networks; a bare address is a /32 (/128)."""
    networks: list[IPNetwork] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"webhook allow-list: {part!r} is not an address or CIDR range") from None
    return tuple(networks)


@dataclass(frozen=True)
class WebhookSettings:
    """One namespace's webhook settings: what a worker with ``--webhook`` is started with."""

    secret: str
    allow: tuple[IPNetwork, ...] = ()
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        decode_secret(self.secret)  # refuse to start, not to sign
        if not 0 < self.timeout_s <= 3600:
            raise ValueError(f"webhook timeout must be in (0, 3600] s, not {self.timeout_s}")

    def __repr__(self) -> str:  # never log the secret
        return f"WebhookSettings(allow={[str(n) for n in self.allow]}, timeout_s={self.timeout_s})"

    @classmethod
    def from_config(cls, cfg: Config, secret_file: str | None = None, allow: str | None = None) -> "WebhookSettings":
        """The secret from ``secret_file`` if given (a file keeps it out of the
        environment and process listings), else ``cfg.webhook_secret``; the
        allow-list from ``allow`` if given, else ``cfg.webhook_allow``.
        Raises ``ValueError`` saying what is missing or wrong."""
        secret = Path(secret_file).read_text().strip() if secret_file else cfg.webhook_secret
        if not secret:
            raise ValueError(
                "webhook tasks need the namespace's signing secret: set LEASESCHED_WEBHOOK_SECRET "
                "or pass --webhook-secret-file (a whsec_<base64> key)"
            )
        return cls(secret, parse_allow(cfg.webhook_allow if allow is None else allow), cfg.webhook_timeout_s)


# ---------------------------------------------------------------- outbound addresses


def refusal(address: IPAddress, allow: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why ``address`` may not be called, or None: only public addresses, unless allowed.

    An IPv4 address inside IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4
    address it reaches."""
    if any(address in network for network in allow):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal(address.ipv4_mapped, allow)
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services such as 169.254.169.254 answer)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:  # before private: Python counts 240.0.0.0/4 as both
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]))
        if address not in found:
            found.append(address)
    return found


# ---------------------------------------------------------------- payload


@dataclass(frozen=True)
class Delivery:
    """What one webhook task sends: a checked payload."""

    url: httpx.URL
    event_type: str
    data: Any

    @property
    def host(self) -> str:
        """The host as DNS and TLS know it (an internationalised name in its IDNA form)."""
        return self.url.raw_host.decode("ascii")

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)


def parse_payload(payload: bytes) -> Delivery:
    """The task's payload as a ``Delivery``, or ``PermanentError`` naming the field:
    a payload that is wrong now is wrong on every retry."""
    try:
        found = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PermanentError(f"payload: not JSON ({exc})") from None
    if not isinstance(found, dict):
        raise PermanentError('payload: must be a JSON object {"url": ..., "event_type": ..., "data": ...}')
    unknown = sorted(set(found) - PAYLOAD_FIELDS)
    if unknown:
        raise PermanentError(f"payload: unknown field(s) {unknown}; known: url, event_type, data")
    url = found.get("url")
    if not isinstance(url, str) or not url:
        raise PermanentError("payload.url: required, a string")
    if len(url) > MAX_URL:
        raise PermanentError(f"payload.url: {len(url)} characters, over the limit of {MAX_URL}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise PermanentError(f"payload.url: not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise PermanentError(f"payload.url: the scheme must be http or https, not {parsed.scheme!r}")
    if not parsed.host:
        raise PermanentError("payload.url: has no host")
    if parsed.userinfo:
        raise PermanentError("payload.url: must not carry credentials (user:password@); receivers check the signature")
    event_type = found.get("event_type", DEFAULT_EVENT_TYPE)
    if not isinstance(event_type, str) or EVENT_TYPE_RE.fullmatch(event_type) is None:
        raise PermanentError(f"payload.event_type: must match {EVENT_TYPE_RE.pattern}, not {event_type!r}")
    return Delivery(parsed.copy_with(fragment=None), event_type, found.get("data"))


def message_body(delivery: Delivery, sent_at: datetime) -> str:
    """The body sent: the Standard Webhooks convention ``{type, timestamp, data}``
    (a receiver can route on ``type`` before it reads ``data``), compact JSON.
    ``timestamp`` is this attempt's send time, the instant of ``webhook-timestamp``."""
    envelope = {"type": delivery.event_type, "timestamp": sent_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "data": delivery.data}
    return json.dumps(envelope, separators=(",", ":"))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header in seconds from ``now``: delay-seconds or an
    HTTP date (RFC 9110 10.2.3); None when absent or unreadable (the task's
    backoff applies then), 0 for a date in the past."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text):
        return float(min(int(text), MAX_RETRY_AFTER_S))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, said without a zone
        when = when.replace(tzinfo=timezone.utc)
    return min(max(0.0, when.timestamp() - now), float(MAX_RETRY_AFTER_S))


# ---------------------------------------------------------------- the handler


class WebhookHandler:
    """The handler of task type ``webhook``; ``run`` is what the worker calls.

    ``resolver``, ``transport`` and ``clock`` are for tests (a fixed DNS
    answer, a transport that trusts a test CA, a fixed time); the defaults are
    the real ones. ``transport`` makes one per delivery (a client closes its
    transport when it closes).
    Each delivery opens its own connection (a client per call): nothing is
    kept between tasks, and a connection to a checked address is never reused
    for a host that resolves elsewhere by now."""

    def __init__(
        self,
        settings: WebhookSettings,
        resolver: Resolver = resolve,
        transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._signer = Webhook(decode_secret(settings.secret))
        self._resolve = resolver
        self._transport = transport
        self._clock = clock

    def timeout_for(self, ctx: TaskContext) -> float:
        """The bound of one delivery: the setting, or 0.9 × start_to_close when
        that is shorter (the handler's own timeout then comes before the
        worker's stop, and is reported as what it is)."""
        if ctx.start_to_close_s > 0:
            return min(self.settings.timeout_s, 0.9 * ctx.start_to_close_s)
        return self.settings.timeout_s

    async def run(self, ctx: TaskContext) -> bytes:
        delivery = parse_payload(ctx.payload)
        timeout = self.timeout_for(ctx)
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._checked_addresses(delivery)
                ctx.ensure_lease()  # the last look before the side effect; webhook-id covers the rest
                return await self._send(ctx, delivery, addresses, timeout)
        except TimeoutError:
            raise WebhookFailed(f"{delivery.host}: no answer within {timeout:g} s", "Timeout") from None

    async def _checked_addresses(self, delivery: Delivery) -> list[IPAddress]:
        """The addresses to connect to, in the resolver's order: every address of
        the host must pass ``refusal`` (one refused address refuses the host:
        which one a client would get is the resolver's choice, not ours)."""
        try:
            addresses = await self._resolve(delivery.host, delivery.port)
        except OSError as exc:  # socket.gaierror: may be a passing DNS fault
            raise WebhookFailed(f"{delivery.host}: cannot resolve ({exc})", "DNSError") from None
        if not addresses:
            raise WebhookFailed(f"{delivery.host}: resolves to no address", "DNSError")
        for address in addresses:
            why = refusal(address, self.settings.allow)
            if why is not None:
                raise PermanentError(
                    f"payload.url: host {delivery.host} resolves to {address}, {why}; refused "
                    "(only public addresses unless the namespace's allow-list, webhook_allow, names it)"
                )
        return addresses

    async def _send(self, ctx: TaskContext, delivery: Delivery, addresses: list[IPAddress], timeout: float) -> bytes:
        """One signed POST, to the first of ``addresses`` that accepts a connection
        (``localhost`` may name ::1 first while the receiver listens on 127.0.0.1
        only); a refused connection moves on, anything later does not."""
        sent_at = datetime.fromtimestamp(int(self._clock()), tz=timezone.utc)
        body = message_body(delivery, sent_at)
        headers = {
            "webhook-id": ctx.task_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(ctx.task_id, sent_at, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": delivery.url.netloc.decode("ascii"),  # the name, though we connect to the address
        }
        # The checked address, never the name again (DNS rebinding); TLS still
        # sends and verifies the name.
        extensions = {"sni_hostname": delivery.host} if delivery.url.scheme == "https" else {}
        async with httpx.AsyncClient(
            transport=self._transport() if self._transport else None, follow_redirects=False, trust_env=False, timeout=timeout
        ) as client:
            for n, address in enumerate(addresses, 1):
                target = delivery.url.copy_with(host=str(address))
                request = client.build_request("POST", target, content=body.encode(), headers=headers, extensions=extensions)
                try:
                    response = await client.send(request, stream=True)
                    break
                except httpx.TimeoutException:
                    raise WebhookFailed(f"{delivery.host}: no answer within {timeout:g} s", "Timeout") from None
                except httpx.ConnectError as exc:
                    if n < len(addresses):
                        continue
                    raise WebhookFailed(f"{delivery.host} ({address}): cannot connect: {exc}", "ConnectError") from None
                except httpx.TransportError as exc:
                    raise WebhookFailed(f"{delivery.host} ({address}): {type(exc).__name__}: {exc}", "ConnectError") from None
            try:
                head = await _read_head(response, RESULT_BODY_BYTES)
            finally:
                await response.aclose()
        return self._judge(delivery, response, head)

    def _judge(self, delivery: Delivery, response: httpx.Response, head: bytes) -> bytes:
        """The answer as an outcome: the result, or the exception that decides the retry."""
        status = response.status_code
        text = head.decode("utf-8", "replace")
        if 200 <= status < 300:
            return json.dumps({"status": status, "body": text}).encode()
        what = f"HTTP {status} from {delivery.host}" + (f": {text[:ERROR_BODY_CHARS]}" if text else "")
        if status in (408, 429) or 500 <= status < 600:
            wait = retry_after_seconds(response.headers.get("retry-after"), self._clock())
            if wait is not None and wait > 0 and status in (429, 503):
                # The remote side said it is too busy and until when: the
                # task's gate (if it has one) closes until then, so the gate's
                # other tasks wait too, and no attempt is used (docs/gates.md).
                raise RateLimited(wait, f"{what} (Retry-After {wait:g} s)", error_type=f"HTTP{status}")
            if wait is not None:
                raise RetryAfter(wait, f"{what} (Retry-After {wait:g} s)", error_type=f"HTTP{status}")
            raise WebhookFailed(what, f"HTTP{status}")
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            raise PermanentError(f"{what}: redirects are not followed (Location: {location[:MAX_URL]})")
        raise PermanentError(what)


async def _read_head(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is never read (a huge or
    endless answer costs nothing). A body that breaks off counts as what came:
    the status line already said how it went."""
    head = b""
    try:
        async for chunk in response.aiter_bytes():
            head += chunk
            if len(head) >= limit:
                break
    except httpx.HTTPError:
        pass
    return head[:limit]


def enable_webhooks(handlers: Handlers, settings: WebhookSettings) -> WebhookHandler:
    """Register the ``webhook`` handler on ``handlers`` (an async handler on the worker's loop)."""
    handler = WebhookHandler(settings)
    handlers.task(WEBHOOK_TYPE, mode=Mode.ASYNC)(handler.run)
    return handler
