"""Adaptive micro-batching: concurrent requests share one model call, each gets its own rows.

Requests wait in a queue; one worker takes the oldest of them, up to `max_batch` texts, as soon
as they fill a batch or the oldest has waited `max_wait_s`, runs the model once on all their
texts in a thread (the event loop keeps accepting requests meanwhile) and hands each request
the slice of rows of its own texts. While the model is busy the queue fills, so under load
batches grow by themselves; a lone request waits at most `max_wait_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class PendingRequest:
    """One caller's texts, the future its rows go to, and when it arrived (loop time)."""

    texts: list[str]
    answer: asyncio.Future
    arrived: float


class BatcherClosed(RuntimeError):
    """A request came after `MicroBatcher.close`."""


class MicroBatcher:
    """Merges concurrent `predict` calls into calls of `predict_batch` (see the module
    docstring). Create it in the event loop; `close` answers what is queued, then stops."""

    def __init__(
        self, predict_batch: Callable[[list[str]], list], max_batch: int, max_wait_s: float
    ) -> None:
        self.predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.loop = asyncio.get_running_loop()
        self.queue: deque[PendingRequest] = deque()
        self.queued_texts = 0
        self.arrival = asyncio.Event()
        self.closing = False
        self.worker = self.loop.create_task(self._run())

    async def predict(self, texts: list[str]) -> list:
        """The rows of `texts`, in order, computed in one batch with other pending requests."""
        if self.closing:
            raise BatcherClosed("the service is shutting down")
        request = PendingRequest(texts, self.loop.create_future(), self.loop.time())
        self.queue.append(request)
        self.queued_texts += len(texts)
        self.arrival.set()
        return await request.answer

    async def close(self) -> None:
        """Refuse new requests, answer the queued ones at once, then end the worker."""
        self.closing = True
        self.arrival.set()
        await self.worker

    async def _run(self) -> None:
        while self.queue or not self.closing:
            if not self.queue:
                self.arrival.clear()
                await self.arrival.wait()
                continue
            await self._wait_for_batch()
            await self._answer(self._take_batch())

    async def _wait_for_batch(self) -> None:
        """Until the queue fills a batch or its oldest request has waited `max_wait_s`."""
        deadline = self.queue[0].arrived + self.max_wait_s
        while self.queued_texts < self.max_batch and not self.closing:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            self.arrival.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrival.wait(), remaining)

    def _take_batch(self) -> list[PendingRequest]:
        """The oldest requests, up to `max_batch` texts; the oldest alone if it is larger."""
        batch = [self.queue.popleft()]
        size = len(batch[0].texts)
        while self.queue and size + len(self.queue[0].texts) <= self.max_batch:
            batch.append(self.queue.popleft())
            size += len(batch[-1].texts)
        self.queued_texts -= size
        return batch

    async def _answer(self, batch: list[PendingRequest]) -> None:
        """Run the model once on the batch's texts; each request gets its own slice."""
        texts = [text for request in batch for text in request.texts]
        try:
            rows = await asyncio.to_thread(self.predict_batch, texts)
        except Exception as error:  # every caller of the batch learns of it
            for request in batch:
                if not request.answer.done():
                    request.answer.set_exception(error)
            return
        start = 0
        for request in batch:
            # A caller that went away (client gone, shutdown timeout) has a cancelled future.
            if not request.answer.done():
                request.answer.set_result(rows[start : start + len(request.texts)])
            start += len(request.texts)
