"""Events: the one message type sources send to the reconciler.

An event only says *something may have changed* and where it came from; the reconciler always
recomputes the whole desired state, so events may be coalesced, dropped or duplicated safely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectSendStream


@dataclass(frozen=True, slots=True)
class Event:
    """A reason to reconcile. ``source`` is e.g. ``file``, ``timer``, ``sighup``, ``startup``."""

    source: str
    detail: str = ""


#: How the daemon hands an event to the reconciler: never blocks, never fails.
Emit = Callable[[Event], None]

#: What a source calls to ask for a reconcile: ``notify(reason)``, where ``reason`` says what it saw
#: (a path, an object name; may be empty). Never blocks, never fails, safe to call often.
Notify = Callable[..., None]


class Source(Protocol):
    """Something that watches the world and asks for reconciles until cancelled (see
    :func:`masqd.hookspecs.register_sources`). ``name`` becomes the event's trigger in logs."""

    name: str

    async def run(self, notify: Notify) -> None: ...


def notifier(emit: Emit, source: str) -> Notify:
    """The ``notify`` handed to the source called ``source``: each call emits one event."""

    def notify(reason: object = "") -> None:
        emit(Event(source, str(reason)))

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
