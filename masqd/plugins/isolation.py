"""Calling third-party plugin code in isolation: a daemon thread per call, under a deadline.

A plugin's hook that hangs must cost one thread, never the agent. :class:`ThreadIsolation` runs
each call in a daemon thread and gives up waiting after ``timeout`` seconds; the call is then
reported hung, and the same hook of the same plugin is not called again until the stuck call
returns (its thread finishes on its own). The same helper serves start-up hooks, called before
any event loop runs (:meth:`ThreadIsolation.call`), and the hooks of each reconcile
(:meth:`ThreadIsolation.acall`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from masqd.errors import safe_repr


class HookFailed(Exception):
    """A hook call that did not give a usable result: ``reason`` says why (hung, raised ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def failure(exc: BaseException) -> str:
    """How a failed hook call is reported: the reason masqd gave (hung, ...), or what it raised."""
    return exc.reason if isinstance(exc, HookFailed) else f"raised {safe_repr(exc)}"


class _Call:
    """One call running in its thread: its outcome once it returns or raises."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ThreadIsolation:
    """Runs calls into plugins in daemon threads with a deadline of ``timeout`` seconds each."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._stuck: dict[tuple[str, str], float] = {}  # (plugin, hook) -> when the hung call started

    def call(self, plugin: str, hook: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` for a start-up hook (registrations), waited for in this thread; raises
        :class:`HookFailed`. It blocks for up to ``timeout``: call it while nothing else needs the
        event loop (an agent being built), never from a running daemon."""
        running = self._start(plugin, hook, fn, wake=None)
        running.finished.wait(self.timeout)
        return self._outcome(plugin, hook, running, ignored="what it registered is ignored")

    async def acall(self, plugin: str, hook: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` from a task: the event loop goes on while it runs; raises :class:`HookFailed`."""
        done = anyio.Event()
        token = anyio.lowlevel.current_token()

        def wake() -> None:
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except RuntimeError:
                pass  # the event loop is gone: nobody is waiting any more

        running = self._start(plugin, hook, fn, wake=wake)
        with anyio.move_on_after(self.timeout):
            await done.wait()
        return self._outcome(plugin, hook, running, ignored="its result is ignored")

    def _start(self, plugin: str, hook: str, fn: Callable[[], Any], wake: Callable[[], None] | None) -> _Call:
        key = (plugin, hook)
        if key in self._stuck:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._stuck[key]))
            # the start time, not the seconds since: the same message each time, logged once
            raise HookFailed(f"still hung in the call started at {since}; not called again until it returns")
        running = _Call()
        self._stuck[key] = time.time()  # until the thread says otherwise

        def work() -> None:
            try:
                running.value = fn()
            except BaseException as exc:  # noqa: BLE001 - even SystemExit is the plugin's failure
                running.error = exc
            finally:
                self._stuck.pop(key, None)
                running.finished.set()
                if wake is not None:
                    wake()

        try:
            threading.Thread(target=work, name=f"masqd plugin {plugin}.{hook}", daemon=True).start()
        except BaseException:
            self._stuck.pop(key, None)  # never started: not hung
            raise
        return running

    def _outcome(self, plugin: str, hook: str, running: _Call, *, ignored: str) -> Any:
        if not running.finished.is_set():
            raise HookFailed(f"did not return within {self.timeout:g} s (hung); {ignored}")
        self._stuck.pop((plugin, hook), None)  # returned, maybe just after the deadline: not hung
        if running.error is not None:
            raise HookFailed(failure(running.error))
        return running.value
