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
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
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
        return grpc.aio.secure_channel(target, _client_credentials(cfg), options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)


def sync_channel(target: str, cfg: Config, token: str | None = None) -> grpc.Channel:
    """A blocking channel (CLI, tests) with ``cfg``'s TLS and token."""
    token = cfg.token if token is None else token
    if tls_enabled(cfg):
        channel = grpc.secure_channel(target, _client_credentials(cfg), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
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
