"""Whether a server authenticates, decided once from configuration."""

from __future__ import annotations

import logging

from leasesched.auth import Authenticator, TokenLookup
from leasesched.config import Config

log = logging.getLogger(__name__)


def make_authenticator(cfg: Config, store: TokenLookup) -> Authenticator | None:
    """An Authenticator, or None when auth was explicitly switched off."""
    if cfg.auth == "off":
        log.warning("AUTHENTICATION IS OFF (auth=off): for local development only, never in production")
        return None
    if cfg.auth != "on":
        raise SystemExit(f"auth must be 'on' or 'off', not {cfg.auth!r}")
    return Authenticator(store, cfg.auth_cache_s)
