"""Events that cannot be missed: a job's states, each kept in order as it happens, and streams that drain them.

    log = EventLog(last=lambda state: state["status"] in FINISHED)
    log.append(state)                       # the worker thread, at every change (a step, a preview, a status)
    async for state in log.follow(disconnected):  # a Server-Sent Events stream, from the first state on
        ...

A snapshot poller can skip states: a job of ten steps may run and end between two of its looks (ComfyUI's server
instead sends each progress and preview message as it happens). Here every change is appended to the job's log
with its sequence number (its index), and a stream sends the log from the first state in order: a stream opened
late still sees every state the job went through, and a preview counted is a preview sent. The worker wakes the
waiting streams through their event loops (``call_soon_threadsafe``); a stream ends after the last state
(``last``) or when its client leaves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

CLIENT_CHECK_S = 1.0  # how often a stream with nothing to send asks whether its client is still there


class EventLog:
    """A job's states in order (see the module doc); appended from any thread, followed from event loops."""

    def __init__(self, last: Callable[[dict], bool]):
        self.last = last
        self._states: list[dict] = []
        self._lock = threading.Lock()
        self._wakers: set[Callable[[], None]] = set()

    def append(self, state: dict) -> None:
        with self._lock:
            self._states.append(state)
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def states(self, start: int = 0) -> list[dict]:
        """The states from sequence number ``start`` on."""
        with self._lock:
            return self._states[start:]

    async def follow(self, disconnected: Callable[[], Awaitable[bool]], start: int = 0) -> AsyncIterator[dict]:
        """Every state from ``start`` on, in order, each as soon as it is appended, until the last one (``last``)
        or until ``disconnected()`` says the client left."""
        loop, changed = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop has closed: its stream is gone
                pass

        with self._lock:
            self._wakers.add(wake)
        try:
            seq = start
            while True:
                changed.clear()  # before reading: a state appended after the read sets it again
                for state in self.states(seq):
                    seq += 1
                    yield state
                    if self.last(state):
                        return
                if await disconnected():
                    return
                try:
                    await asyncio.wait_for(changed.wait(), CLIENT_CHECK_S)
                except TimeoutError:
                    pass
        finally:
            with self._lock:
                self._wakers.discard(wake)
