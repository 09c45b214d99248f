"""Events: the one message type event sources send to the reconciler, and the event source protocol.

An event only says *something may have changed* and what noticed it; the reconciler always
recomputes the whole desired state, so events may be coalesced, dropped or duplicated safely.

Vocabulary: an *event source* (:class:`EventSource`: the file watch, the resync timer, an API
watch, a plugin's) only says that something may have changed; a *config input*
(:mod:`masqd.inputs`) is what the reconciler reads the config from. A config input names the
event source that watches it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectSendStream


@dataclass(frozen=True, slots=True)
class Event:
    """A reason to reconcile. ``trigger`` names what noticed it: an event source (``file``,
    ``timer``, ``configmap``, ``egress-nat-policies``, ``kernel-monitor``, ``drift-check``, a
    plugin's source), ``sighup``, ``startup``, ``retry`` (a failed sync tried again), or
    ``manual`` (one pass outside the daemon: ``run --once``, the test harness); it labels the pass
    in logs, audit events and metrics."""

    trigger: str
    detail: str = ""


#: How the daemon hands an event to the reconciler: never blocks, never fails.
Emit = Callable[[Event], None]

#: What a source calls to ask for a reconcile: ``notify(reason)``, where ``reason`` says what it saw
#: (a path, an object name; may be empty). Never blocks, never fails, safe to call often.
Notify = Callable[..., None]


class EventSource(Protocol):
    """Something that watches the world and asks for reconciles until cancelled (see
    :func:`masqd.hookspecs.register_sources`). ``name`` (optional for plugins' sources) becomes
    the event's trigger. Optional: ``async def read_once()``, which one-shot commands call instead
    of ``run`` to bring what the source holds up to date once."""

    async def run(self, notify: Notify) -> None: ...


def notifier(emit: Emit, trigger: str) -> Notify:
    """The ``notify`` handed to the event source called ``trigger``: each call emits one event."""

    def notify(reason: object = "") -> None:
        emit(Event(trigger, str(reason)))

    return notify


def make_emit(send: MemoryObjectSendStream[Event]) -> Emit:
    """An :data:`Emit` over a memory stream. When the buffer is full a sync is already pending,
    which will see the newest state, so the event is dropped rather than blocking the source."""

    def emit(event: Event) -> None:
        try:
            send.send_nowait(event)
        except anyio.WouldBlock:
            pass

    return emit
