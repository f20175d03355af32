"""The webhook handler against a real local HTTP receiver (pytest-httpserver):
signatures verify with the Standard Webhooks library, webhook-id is the task
id on every attempt, each answer maps to its outcome, and outbound addresses
are refused unless public or allowed. No Cassandra, no ZooKeeper."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook
from werkzeug import Request, Response

from leasesched.cli import process_cmd
from leasesched.config import Config
from leasesched.limits import RETRY_INTERVAL
from worker.handlers import Handlers, PermanentError, RateLimited, RetryAfter, TaskContext
from worker.webhook import (
    WEBHOOK_TYPE,
    IPAddress,
    WebhookFailed,
    WebhookHandler,
    WebhookSettings,
    enable_webhooks,
    parse_allow,
    parse_payload,
    refusal,
    retry_after_seconds,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
LOOPBACK = parse_allow("127.0.0.0/8,::1/128")
TASK_ID = "0b0c6d1e-7f8a-4b9c-8d0e-1f2a3b4c5d6e"


@pytest.fixture(scope="module")
def server() -> Iterator[HTTPServer]:
    """A threaded receiver on 127.0.0.1 (a slow answer must not hold up the next test)."""
    srv = HTTPServer(host="127.0.0.1", threaded=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.clear()
        if srv.is_running():
            srv.stop()


@pytest.fixture
def receiver(server: HTTPServer) -> Iterator[HTTPServer]:
    server.clear()
    yield server
    server.clear()


def ctx(payload: Any, attempt: int = 1, start_to_close_s: float = 0.0) -> TaskContext:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return TaskContext(
        task_id=TASK_ID, type=WEBHOOK_TYPE, namespace="ns", payload=raw, attempt=attempt, lease_token=attempt,
        worker_id="w", start_to_close_s=start_to_close_s,
    )  # fmt: skip


def handler(allow: str = "127.0.0.0/8,::1/128", timeout_s: float = 5.0, **kwargs: Any) -> WebhookHandler:
    return WebhookHandler(WebhookSettings(SECRET, parse_allow(allow), timeout_s), **kwargs)


def payload(server: HTTPServer, path: str = "/hook", **extra: Any) -> dict[str, Any]:
    return {"url": server.url_for(path), "event_type": "invoice.paid", "data": {"n": 1}, **extra}


def verified(request: Request) -> Any:
    """What a receiver does: verify the signature over the raw body, then parse it."""
    return Webhook(SECRET).verify(request.get_data(), dict(request.headers))


def requests_seen(server: HTTPServer) -> list[Request]:
    return [request for request, _ in server.log]


async def logged(server: HTTPServer, count: int) -> None:
    """Wait until the server logged ``count`` requests. A threaded server logs a
    request when its answer is written, which can be after the client gave up
    (a timeout, a body read only in part): a test that leaves such a request
    behind waits for it, or it would land in the next test's log."""
    deadline = time.monotonic() + 10
    while len(server.log) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(server.log) == count


# ---------------------------------------------------------------- outcomes


async def test_a_2xx_succeeds_with_a_signature_the_receiver_verifies(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook", method="POST").respond_with_data("thanks", status=200)
    result = json.loads(await handler().run(ctx(payload(receiver))))
    assert result == {"status": 200, "body": "thanks"}
    (request,) = requests_seen(receiver)
    body = verified(request)
    assert body["type"] == "invoice.paid" and body["data"] == {"n": 1}
    assert request.headers["webhook-id"] == TASK_ID
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert request.headers["content-type"] == "application/json"
    # The envelope's timestamp is the instant of the header.
    stamp = body["timestamp"]
    assert stamp == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(request.headers["webhook-timestamp"])))


async def test_a_signature_made_with_another_secret_does_not_verify(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("ok")
    await handler().run(ctx(payload(receiver)))
    (request,) = requests_seen(receiver)
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(other).verify(request.get_data(), dict(request.headers))


async def test_webhook_id_is_the_task_id_on_every_attempt_and_the_retry_is_signed_anew(receiver: HTTPServer) -> None:
    answers = iter([Response("busy", status=503), Response("ok", status=200)])
    receiver.expect_request("/hook").respond_with_handler(lambda request: next(answers))
    hook = handler()
    with pytest.raises(WebhookFailed) as failed:
        await hook.run(ctx(payload(receiver), attempt=1))
    assert failed.value.error_type == "HTTP503" and "busy" in str(failed.value)
    assert not isinstance(failed.value, (PermanentError, RetryAfter))
    await hook.run(ctx(payload(receiver), attempt=2))
    first, second = requests_seen(receiver)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == TASK_ID
    assert verified(first)["data"] == verified(second)["data"] == {"n": 1}


async def test_a_400_is_permanent(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("bad field x", status=400)
    with pytest.raises(PermanentError, match="HTTP 400 from 127.0.0.1: bad field x"):
        await handler().run(ctx(payload(receiver)))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_408_429_and_5xx_are_retried(receiver: HTTPServer, status: int) -> None:
    receiver.expect_request("/hook").respond_with_data("", status=status)
    with pytest.raises(WebhookFailed) as failed:
        await handler().run(ctx(payload(receiver)))
    assert failed.value.error_type == f"HTTP{status}"


@pytest.mark.parametrize("status", [401, 403, 404, 410, 422])
async def test_other_4xx_are_permanent(receiver: HTTPServer, status: int) -> None:
    receiver.expect_request("/hook").respond_with_data("", status=status)
    with pytest.raises(PermanentError, match=f"HTTP {status}"):
        await handler().run(ctx(payload(receiver)))


async def test_a_429_with_retry_after_seconds_asks_for_that_wait(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("slow down", status=429, headers={"Retry-After": "2"})
    with pytest.raises(RetryAfter) as raised:
        await handler().run(ctx(payload(receiver)))
    assert raised.value.seconds == 2 and raised.value.milliseconds == 2000
    assert raised.value.error_type == "HTTP429" and "slow down" in str(raised.value)


async def test_a_503_with_retry_after_as_an_http_date(receiver: HTTPServer) -> None:
    now = 1_900_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    receiver.expect_request("/hook").respond_with_data("", status=503, headers={"Retry-After": date})
    with pytest.raises(RetryAfter) as raised:
        await handler(clock=lambda: now).run(ctx(payload(receiver)))
    assert raised.value.seconds == 30 and raised.value.error_type == "HTTP503"


@pytest.mark.parametrize("status,limited", [(429, True), (503, True), (408, False), (502, False)])
async def test_a_429_or_503_with_retry_after_closes_the_gate(receiver: HTTPServer, status: int, limited: bool) -> None:
    """429/503 with Retry-After: RateLimited (the task's gate closes, no attempt used); other
    statuses with Retry-After stay a plain RetryAfter (docs/gates.md)."""
    receiver.expect_request("/hook").respond_with_data("busy", status=status, headers={"Retry-After": "3"})
    with pytest.raises(RetryAfter) as raised:
        await handler().run(ctx(payload(receiver)))
    assert isinstance(raised.value, RateLimited) is limited
    assert raised.value.seconds == 3 and raised.value.error_type == f"HTTP{status}"


def test_retry_after_values() -> None:
    now = 1_900_000_000.0
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds(" 0 ", now) == 0
    assert retry_after_seconds(email.utils.formatdate(now - 60, usegmt=True), now) == 0  # in the past: at once
    assert retry_after_seconds(None, now) is None
    for unreadable in ("soon", "-5", "1.5", "", "²"):
        assert retry_after_seconds(unreadable, now) is None, unreadable
    # Nonsense sizes are cut here, and RetryAfter cuts to what the TaskUpdater accepts.
    huge = retry_after_seconds("9" * 400, now)
    assert huge is not None and RetryAfter(huge).milliseconds == RETRY_INTERVAL.high


async def test_a_receiver_slower_than_the_timeout_is_retried(receiver: HTTPServer) -> None:
    def slow(request: Request) -> Response:
        time.sleep(1.5)
        return Response("late")

    receiver.expect_request("/hook").respond_with_handler(slow)
    started = time.monotonic()
    with pytest.raises(WebhookFailed) as failed:
        await handler(timeout_s=0.3).run(ctx(payload(receiver)))
    assert failed.value.error_type == "Timeout" and time.monotonic() - started < 1.4  # the answer comes at 1.5 s
    await logged(receiver, 1)  # the late answer


def test_the_timeout_stays_below_start_to_close() -> None:
    hook = handler(timeout_s=10)
    assert hook.timeout_for(ctx({})) == 10
    assert hook.timeout_for(ctx({}, start_to_close_s=5)) == pytest.approx(4.5)
    assert hook.timeout_for(ctx({}, start_to_close_s=60)) == 10


async def test_a_refused_connection_is_retried() -> None:
    from leasesched.testing import free_ports

    (port,) = free_ports(1)
    with pytest.raises(WebhookFailed) as failed:
        await handler().run(ctx({"url": f"http://127.0.0.1:{port}/hook"}))
    assert failed.value.error_type == "ConnectError"


async def test_a_redirect_is_not_followed(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("", status=302, headers={"Location": "http://10.0.0.1/x"})
    receiver.expect_request("/elsewhere").respond_with_data("should not be reached")
    with pytest.raises(PermanentError, match="redirects are not followed.*10.0.0.1"):
        await handler().run(ctx(payload(receiver)))
    assert [r.path for r in requests_seen(receiver)] == ["/hook"]


async def test_only_the_head_of_a_large_answer_is_kept(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("x" * 100_000)
    result = json.loads(await handler().run(ctx(payload(receiver))))
    assert result["body"] == "x" * 256
    await logged(receiver, 1)  # once it gave up writing the rest


# ---------------------------------------------------------------- outbound addresses


async def test_loopback_is_refused_without_the_allow_list(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("ok")
    with pytest.raises(PermanentError, match=r"payload.url: host 127.0.0.1 resolves to 127.0.0.1, a loopback address"):
        await handler(allow="").run(ctx(payload(receiver)))
    assert requests_seen(receiver) == []


async def test_localhost_by_name_is_refused_and_allowed_by_its_range(receiver: HTTPServer) -> None:
    receiver.expect_request("/hook").respond_with_data("ok")
    url = f"http://localhost:{receiver.port}/hook"
    with pytest.raises(PermanentError, match="host localhost resolves to .*loopback"):
        await handler(allow="").run(ctx({"url": url}))
    # localhost may resolve to ::1 first; the receiver listens on 127.0.0.1: the next address is tried.
    assert json.loads(await handler().run(ctx({"url": url})))["status"] == 200
    (request,) = requests_seen(receiver)
    assert request.headers["host"] == f"localhost:{receiver.port}"


async def test_the_metadata_address_is_refused_before_any_connection() -> None:
    with pytest.raises(PermanentError, match=r"169.254.169.254, a link-local address \(where cloud metadata"):
        await handler(allow="127.0.0.0/8").run(ctx({"url": "http://169.254.169.254/latest/meta-data/"}))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),  # ULA
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged as the IPv4 address
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    found = refusal(ipaddress.ip_address(address))
    assert found is not None and why in found


def test_public_addresses_and_allowed_ranges_pass() -> None:
    for public in ("93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"):
        assert refusal(ipaddress.ip_address(public)) is None, public
    allow = parse_allow("10.0.0.0/8, 127.0.0.1")
    assert refusal(ipaddress.ip_address("10.200.0.1"), allow) is None
    assert refusal(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert refusal(ipaddress.ip_address("127.0.0.2"), allow) is not None  # a bare address is a /32
    assert refusal(ipaddress.ip_address("192.168.0.1"), allow) is not None


def test_a_bad_allow_list_names_the_entry() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an address or CIDR range"):
        parse_allow("127.0.0.1/32,10.0.0.0/33")


async def test_one_refused_address_refuses_the_host() -> None:
    async def public_and_private(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("10.0.0.7")]

    with pytest.raises(PermanentError, match="hooks.example.test resolves to 10.0.0.7, a private address"):
        await handler(allow="", resolver=public_and_private).run(ctx({"url": "https://hooks.example.test/in"}))


async def test_the_request_goes_to_the_checked_address_with_the_name_as_host(receiver: HTTPServer) -> None:
    """DNS rebinding: the address that was checked is the one connected to; the
    name is not resolved a second time by the HTTP client."""
    resolved: list[str] = []

    async def once(host: str, port: int) -> list[IPAddress]:
        resolved.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    receiver.expect_request("/in").respond_with_data("ok")
    url = f"http://hooks.example.test:{receiver.port}/in"  # a name no resolver knows
    assert json.loads(await handler(resolver=once).run(ctx({"url": url})))["status"] == 200
    assert resolved == ["hooks.example.test"]
    (request,) = requests_seen(receiver)
    assert request.path == "/in" and request.headers["host"] == f"hooks.example.test:{receiver.port}"
    verified(request)


async def test_an_unknown_host_is_retried_as_a_dns_error() -> None:
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise OSError("Name or service not known")

    with pytest.raises(WebhookFailed) as failed:
        await handler(resolver=nxdomain).run(ctx({"url": "https://nowhere.example.test/"}))
    assert failed.value.error_type == "DNSError"


# ---------------------------------------------------------------- payloads and settings


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "payload: not JSON"),
        (b"\xff\xfe", "payload: not JSON"),
        (b"[1, 2]", "payload: must be a JSON object"),
        (json.dumps({"data": 1}).encode(), "payload.url: required"),
        (json.dumps({"url": 5}).encode(), "payload.url: required"),
        (json.dumps({"url": "ftp://example.com/x"}).encode(), "payload.url: the scheme must be http or https"),
        (json.dumps({"url": "file:///etc/passwd"}).encode(), "payload.url: the scheme must be http or https"),
        (json.dumps({"url": "https://"}).encode(), "payload.url"),
        (json.dumps({"url": "https://u:p@example.com/"}).encode(), "payload.url: must not carry credentials"),
        (json.dumps({"url": "https://example.com/" + "a" * 2100}).encode(), "payload.url: 2120 characters"),
        (json.dumps({"url": "https://example.com/", "event_type": ""}).encode(), "payload.event_type"),
        (json.dumps({"url": "https://example.com/", "event_type": "a b"}).encode(), "payload.event_type"),
        (json.dumps({"url": "https://example.com/", "event_type": 7}).encode(), "payload.event_type"),
        (json.dumps({"url": "https://example.com/", "URL": "x"}).encode(), "payload: unknown field(s) ['URL']"),
    ],
)
async def test_a_bad_payload_is_permanent_and_names_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(PermanentError) as raised:
        await handler().run(ctx(raw))
    assert str(raised.value).startswith(field), str(raised.value)


def test_a_payload_without_event_type_or_data_gets_the_defaults() -> None:
    delivery = parse_payload(b'{"url": "https://example.com/in#frag"}')
    assert (delivery.event_type, delivery.data, str(delivery.url)) == ("leasesched.webhook", None, "https://example.com/in")


def test_settings_refuse_a_missing_short_or_malformed_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need the namespace's signing secret"):
        WebhookSettings.from_config(Config())
    with pytest.raises(ValueError, match="8 bytes; at least 24"):
        WebhookSettings("whsec_" + base64.b64encode(b"12345678").decode())
    with pytest.raises(ValueError, match="not whsec_<base64>"):
        WebhookSettings("whsec_not*base64!" + "A" * 40)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    settings = WebhookSettings.from_config(Config(webhook_allow="10.0.0.0/8", webhook_timeout_s=3), str(secret_file))
    assert settings.secret == SECRET and settings.timeout_s == 3
    assert [str(n) for n in settings.allow] == ["10.0.0.0/8"]
    assert SECRET not in repr(settings) and "k" * 5 not in repr(settings)
    from_env = WebhookSettings.from_config(Config(webhook_secret=SECRET), allow="127.0.0.1/32")
    assert [str(n) for n in from_env.allow] == ["127.0.0.1/32"]


def test_enable_webhooks_registers_an_async_handler_for_the_type() -> None:
    handlers = Handlers("ns")
    enable_webhooks(handlers, WebhookSettings(SECRET))
    registered = handlers.get(WEBHOOK_TYPE)
    assert registered is not None and registered.mode == "async" and handlers.types == ["webhook"]


def test_the_worker_refuses_to_start_webhooks_without_a_secret() -> None:
    result = CliRunner().invoke(process_cmd.worker, ["--webhook"], obj=Config())
    assert result.exit_code == 2 and "signing secret" in result.output
    result = CliRunner().invoke(process_cmd.worker, [], obj=Config())
    assert result.exit_code == 2 and "--module" in result.output
    result = CliRunner().invoke(process_cmd.worker, ["--webhook"], obj=Config(webhook_secret="whsec_c2hvcnQ="))
    assert result.exit_code == 2 and "at least 24" in result.output


async def test_the_handler_runs_under_the_timeout_even_when_resolving_hangs() -> None:
    async def hang(host: str, port: int) -> list[IPAddress]:
        await asyncio.sleep(10)
        return []

    with pytest.raises(WebhookFailed) as failed:
        await handler(timeout_s=0.2, resolver=hang).run(ctx({"url": "https://slow-dns.example.test/"}))
    assert failed.value.error_type == "Timeout"


async def test_https_goes_to_the_checked_address_and_verifies_the_certificate_against_the_name(tmp_path: Path) -> None:
    """TLS with the pinned address: the server name sent and verified is the URL's host,
    not the address connected to (the test certificate names localhost and 127.0.0.1)."""
    import ssl

    import httpx

    from tests.tls_certs import make_certs

    certs = make_certs(tmp_path / "tls")
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certs.server_cert, certs.server_key)
    server = HTTPServer(host="127.0.0.1", ssl_context=server_side, threaded=True)
    server.start()
    try:
        server.expect_request("/hook").respond_with_data("secure")

        async def to_loopback(host: str, port: int) -> list[IPAddress]:
            return [ipaddress.ip_address("127.0.0.1")]

        def trusting() -> httpx.AsyncHTTPTransport:
            return httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=str(certs.ca)))

        ok = handler(resolver=to_loopback, transport=trusting)
        result = json.loads(await ok.run(ctx({"url": f"https://localhost:{server.port}/hook"})))
        assert result == {"status": 200, "body": "secure"}
        # A name the certificate does not carry fails, although the address (127.0.0.1) is in it.
        with pytest.raises(WebhookFailed, match="hooks.example.test.*certificate") as failed:
            url = f"https://hooks.example.test:{server.port}/hook"
            await handler(resolver=to_loopback, transport=trusting).run(ctx({"url": url}))
        assert failed.value.error_type == "ConnectError"
    finally:
        server.clear()
        server.stop()
