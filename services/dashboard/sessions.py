"""Logged-in sessions, held server-side.

Decision (docs/dashboard.md, "Sessions and tokens"): the bearer token never
goes back to the browser. After login the dashboard keeps the token, the
identity the API showed for it and the session's gRPC client in this store,
under a random session id; the browser's cookie carries only that id (and
the CSRF token) in Starlette's signed session cookie (itsdangerous, HttpOnly,
SameSite=Lax). A stolen cookie is therefore worth at most the session (until
logout or expiry), never the token itself, and logging out ends it here. The
price: sessions live in the process's memory, so a restarted dashboard asks
everyone to log in again.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from services.dashboard.api import DashboardApi, Identity


@dataclass
class Session:
    sid: str
    identity: Identity
    api: DashboardApi  # holds the token; the token is not kept anywhere else
    created: float
    last_seen: float = field(default=0.0)


class SessionStore:
    """Sessions by id, each ending after ``idle_s`` without a request or ``max_age_s``
    after login; at most ``max_sessions`` (the oldest is ended to make room)."""

    def __init__(self, idle_s: float = 8 * 3600, max_age_s: float = 24 * 3600, max_sessions: int = 1000) -> None:
        self._idle_s = idle_s
        self._max_age_s = max_age_s
        self._max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # sync endpoints run in a thread pool

    def create(self, identity: Identity, api: DashboardApi) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), identity, api, now, now)
        ended: list[Session] = []
        with self._lock:
            ended.extend(self._expired(now))
            while len(self._sessions) >= self._max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                ended.append(self._sessions.pop(oldest.sid))
            self._sessions[session.sid] = session
        for old in ended:
            old.api.close()
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if now - session.last_seen > self._idle_s or now - session.created > self._max_age_s:
                del self._sessions[sid]
                session.api.close()
                return None
            session.last_seen = now
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            session = self._sessions.pop(sid or "", None)
        if session is not None:
            session.api.close()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.api.close()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, now: float) -> list[Session]:
        gone = [s for s in self._sessions.values() if now - s.last_seen > self._idle_s or now - s.created > self._max_age_s]
        for s in gone:
            del self._sessions[s.sid]
        return gone
