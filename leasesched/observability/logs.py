"""Structured logs: one JSON object per line, with the task, lease, shard and
worker a line is about.

Every leasesched process logs through the standard ``logging`` module; this
module only formats. A line carries::

    {"ts": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "services.task_updater",
     "msg": "task … claimed", "role": "task-updater", "pid": 4242,
     "task_id": "…", "lease_token": 7, "worker": "host-4242-ab12", "shard": 12}

The context fields come from two places, the second winning:

* ``log_context(task_id=…)`` / ``bind(…)``: a context variable, so that every
  line logged inside one asyncio task (an execution on a worker, a shard
  scanner on a trigger) carries them without passing them around;
* ``extra=fields(task_id=…, lease_token=…)`` on a single call.

Any other ``extra=`` key is written too. ``--log-format text`` gives the
classic one-line text format with the same fields appended as ``key=value``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FORMATS = ("json", "text")
# The fields operators filter on; documented in docs/operations.md.
CONTEXT_FIELDS = ("task_id", "lease_token", "shard", "worker")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("leasesched_log_context", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for one log call, without the fields that are None."""
    return {k: v for k, v in values.items() if v is not None}


def bind(**values: Any) -> contextvars.Token[dict[str, Any] | None]:
    """Add fields to every line logged from now on in this context (asyncio task or thread)."""
    return _context.set({**(_context.get() or {}), **fields(**values)})


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    token = bind(**values)
    try:
        yield
    finally:
        _context.reset(token)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    found = dict(_context.get() or {})
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            found[key] = value
    return found


# One encoder for every line: ``json.dumps(..., default=str)`` builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class _Pid:
    """This process's id, read once and again after a fork: ``getpid()`` is a
    system call on every LogRecord otherwise (``setup`` turns that off)."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.refresh)


class _Second:
    """The formatted second of the last line: strftime once per second, not
    per line. A tuple swapped whole, so threads logging at once never mix two."""

    cached: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    second = int(created)
    cached = _Second.cached
    if cached[0] != second:
        cached = _Second.cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never raises on odd values (they become strings)."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._role:
            out["role"] = self._role
        out["pid"] = record.process if record.process is not None else _Pid.value
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(out)


class TextFormatter(logging.Formatter):
    """The classic text line, with the context fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the first line
        tags = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} [{tags}]{sep}{rest}"


def setup(log_format: str = "json", level: str = "INFO", role: str = "") -> None:
    """Send every log record to stderr in ``log_format`` ("json" or "text").

    In JSON mode, warnings and uncaught exceptions (main thread and other
    threads) become log records too, so the output stays one object per line.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # No line shows the caller's file and line, thread or process name, and
    # the pid comes from ``_Pid``: skip looking them up for every record (the
    # logging HOWTO's "Optimization"). A service logs a line or two per task;
    # the lookups were a third of the cost of a line (a stack walk and a
    # getpid system call each).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("leasesched").critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("leasesched").error(
        "uncaught %s in thread %s: %s", args.exc_type.__name__, name, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )  # fmt: skip
