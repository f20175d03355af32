"""worker.handlers: how a handler's mode is chosen and checked."""

from __future__ import annotations

import pytest

from worker.handlers import Handlers, Mode, TaskContext


def test_modes_default_from_the_function_and_strings_are_accepted() -> None:
    handlers = Handlers()

    @handlers.task("t.async")
    async def a(ctx: TaskContext) -> None: ...

    @handlers.task("t.thread")
    def b(ctx: TaskContext) -> None: ...

    @handlers.task("t.process", mode="process")
    def c(ctx: TaskContext) -> None: ...

    modes = {t: handlers.get(t).mode for t in handlers.types}  # type: ignore[union-attr]
    assert modes == {"t.async": Mode.ASYNC, "t.thread": Mode.THREAD, "t.process": Mode.PROCESS}
    assert all(type(m) is Mode for m in modes.values())


def test_a_bad_mode_is_refused_at_registration() -> None:
    handlers = Handlers()
    with pytest.raises(ValueError, match="mode must be async, thread or process, not 'fork'"):
        handlers.task("t.x", mode="fork")(lambda ctx: None)
    with pytest.raises(ValueError, match="needs an async def"):
        handlers.task("t.y", mode=Mode.ASYNC)(lambda ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        handlers.task("t.z")(lambda ctx: None)
        handlers.task("t.z")(lambda ctx: None)
