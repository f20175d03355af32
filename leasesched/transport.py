"""gRPC channels and server ports, built one way for every process and tool.

Clients present their bearer token on every call (a client interceptor adds
the ``authorization`` metadata, which works on plain and TLS channels alike)
and use TLS when the configuration names certificate files. Servers listen
with TLS when ``tls_cert``/``tls_key`` are set, and require client
certificates when ``tls_require_client_cert`` is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import grpc

from leasesched.config import Config

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(cfg: Config) -> list[tuple[str, int]]:
    """Every client channel's options.

    Keepalive: a ping every ``grpc_keepalive_s`` (20 s) on an idle connection,
    and the connection is given up when the answer takes 10 s: a worker's
    Subscribe stream can be silent for hours, and a peer that vanished
    (a dead machine, a dropped NAT entry) must not leave it waiting on a dead
    socket. ``max_pings_without_data = 0`` keeps pinging while nothing else is
    sent (gRPC's default stops after 2 pings, which left quiet streams unwatched).
    The servers must accept this rate: see ``server_options``, built from the
    same setting.
    """
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(cfg.grpc_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(cfg: Config) -> list[tuple[str, int]]:
    """The ping policy of every server, matched to ``channel_options``.

    gRPC servers by default accept a ping without data in between only every
    5 minutes; more frequent ones are "strikes", and after 2 strikes the
    server ends the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    Our clients ping every ``grpc_keepalive_s`` (20 s), so every few minutes
    each worker's streams were cut, logged at ERROR by gRPC, and
    re-subscribed. Servers now accept pings down to half the client's
    interval (timer jitter and a ping delayed behind data must never count
    as a strike), also on connections without a call in progress (a worker's
    TaskUpdater channel between tasks).
    """
    min_interval_ms = max(1, int(cfg.grpc_keepalive_s * 1000) // 2)
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_interval_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
    ]

# Answers that mean "this server is gone or going": an idempotent call (ScheduleTask
# with its idempotency key, PollTask, a worker's fenced report) may go again, to
# another instance. CANCELLED belongs here because a stopping gRPC server answers
# CANCELLED, not UNAVAILABLE, to calls that had arrived but not yet reached a
# handler (grpc/grpc#41785); leasesched's clients never cancel a call themselves
# and then look at its code.
SERVER_GONE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def tls_enabled(cfg: Config) -> bool:
    return bool(cfg.tls_ca or cfg.tls_cert)


def _client_credentials(cfg: Config) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.tls_ca),
        private_key=_read(cfg.tls_client_key),
        certificate_chain=_read(cfg.tls_client_cert),
    )


def _token_metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _with_token(details: Any, token: str) -> Any:
    # grpc.aio's call objects expect a grpc.aio.Metadata here (a plain list is
    # silently dropped on stream calls).
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *_token_metadata(token))
    return details._replace(metadata=metadata)


class _AioUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _AioStreamToken(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self._token), request_iterator)


def _aio_interceptors(token: str) -> list[Any] | None:
    # One object per call type: grpc.aio files each interceptor under the
    # first call type it implements only.
    return [_AioUnaryToken(token), _AioStreamToken(token)] if token else None


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_ClientCallDetails.of(details, self._token), request)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, request_iterator: Any) -> Any:
        return continuation(_ClientCallDetails.of(details, self._token), request_iterator)


class _ClientCallDetails(grpc.ClientCallDetails):
    """The sync API's call details are a plain interface: build a copy with our metadata."""

    def __init__(self, method: str, timeout: Any, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression

    @classmethod
    def of(cls, details: Any, token: str) -> "_ClientCallDetails":
        metadata = list(details.metadata or []) + _token_metadata(token)
        return cls(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )


def aio_channel(target: str, cfg: Config, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` with ``cfg``'s TLS and token (default ``cfg.token``)."""
    token = cfg.token if token is None else token
    interceptors = _aio_interceptors(token)
    if tls_enabled(cfg):
        return grpc.aio.secure_channel(target, _client_credentials(cfg), options=channel_options(cfg), interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=channel_options(cfg), interceptors=interceptors)


def sync_channel(target: str, cfg: Config, token: str | None = None) -> grpc.Channel:
    """A blocking channel (CLI, tests) with ``cfg``'s TLS and token."""
    token = cfg.token if token is None else token
    if tls_enabled(cfg):
        channel = grpc.secure_channel(target, _client_credentials(cfg), options=channel_options(cfg))
    else:
        channel = grpc.insecure_channel(target, options=channel_options(cfg))
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


def add_port(server: grpc.aio.Server, bind: str, cfg: Config) -> int:
    """Listen on ``bind``: TLS when a server certificate is configured."""
    if cfg.tls_cert and cfg.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
            root_certificates=_read(cfg.tls_ca),
            require_client_auth=bool(cfg.tls_require_client_cert),
        )
        return server.add_secure_port(bind, credentials)
    return server.add_insecure_port(bind)
