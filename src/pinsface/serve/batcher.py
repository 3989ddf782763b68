"""The Recognizer's work for the server: identify requests are gathered into shared batches; calls that need
the recogniser to themselves run alone.

The Recognizer's detection and naming go through ``InferenceWorker``, on two threads: one finds the faces of
each batch (``Recognizer.detect_batch``, the detector alone) and runs calls (``run``), the other names the faces
found (``Recognizer.name_batch``, the backbone and the gallery). So the next batch is detected while this one is
named. An exclusive call waits until naming is idle; a call that only finds and embeds faces (enrolment's) runs
beside naming. Enrolment and forgetting themselves change the recogniser's state on copies and swap it in one
step under its own lock (``Recognizer.enroll_faces``), outside this worker. Requests waiting are bounded (in
images): past the bound ``submit`` raises ``QueueFull`` at once instead of letting memory grow.

Queueing is fair between requests: a request's photos are queued in parts of ``fair_share`` images, and the
next batch starts with the earliest part of the lowest rank (a request's first part, then second ...). So a
request of one photo waits for at most the batch under way, however many photos another request sent.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """Too much work is already waiting; the caller should retry later."""


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    weight: int  # images (identify) or 1 (exclusive)
    images: list = field(default_factory=list)  # identify: encoded photos
    pixels: int = 0  # identify: their decoded size, to bound a batch's memory
    options: tuple = ()  # identify: (top_k, threshold, min_probability); only equal options share a batch
    call: Callable[[Any], Any] | None = None  # exclusive: fn(recognizer)
    queued_at: float = 0.0
    part: int = 0  # identify: which part of its request (see the module on fair queueing)
    exclusive: bool = True  # a call: with nothing being named meanwhile

    def rank(self) -> tuple[int, float]:
        return self.part, self.queued_at


class InferenceWorker:
    """Names the faces in batches of up to ``max_batch`` images gathered for up to ``max_wait`` seconds from
    concurrent requests (detection and naming on two threads, see the module), and runs exclusive calls
    (``run``) one at a time, with nothing else running."""

    def __init__(
        self,
        recognizer,
        *,
        max_batch: int = 32,
        max_wait: float = 0.01,
        max_pending: int = 256,
        max_batch_pixels: int = 200_000_000,
        fair_share: int = 4,
        on_batch: Callable[[int, float], None] | None = None,
        on_change: Callable[[Any], None] | None = None,
    ):
        self.recognizer = recognizer
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.max_batch_pixels = max_batch_pixels
        self.fair_share = max(1, fair_share)
        self.on_batch = on_batch  # (images, seconds) after each identify batch, from the worker thread
        self.on_change = on_change  # (recognizer) after each exclusive call, from the worker thread
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # weight queued or running
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pinsface-inference", daemon=True)
        # Detected batches waiting to be named: one, so detection runs at most one batch ahead.
        self._naming: queue.Queue = queue.Queue(maxsize=1)
        self._namer = threading.Thread(target=self._name_loop, name="pinsface-naming", daemon=True)

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> InferenceWorker:
        self._namer.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._naming.put(None)
        self._namer.join(timeout)

    async def identify(
        self,
        images: list[bytes],
        pixels: list[int],
        top_k: int,
        threshold: float | None,
        min_probability: float | None,
    ) -> list:
        """``ImageResult``s for ``images`` (encoded bytes; ``pixels``: each one's decoded size), computed in
        batches shared with other requests, in parts of ``fair_share`` images."""
        n = self.fair_share
        parts = [
            _Job(
                None,
                None,
                len(images[lo : lo + n]),
                images=images[lo : lo + n],
                pixels=sum(pixels[lo : lo + n]),
                options=(top_k, threshold, min_probability),
                part=k,
            )
            for k, lo in enumerate(range(0, len(images), n))
        ]
        results = await self._submit(parts)
        return [result for part in results for result in part]

    async def run(self, call: Callable[[Any], Any], exclusive: bool = True) -> Any:
        """``call(recognizer)`` on the detection thread: alone (``exclusive``), or beside the naming of the
        batch before, as a batch's detection runs (a call that only finds and embeds faces, as enrolment's)."""
        return (await self._submit([_Job(None, None, 1, call=call, exclusive=exclusive)]))[0]

    async def _submit(self, jobs: list[_Job]) -> list:
        """Queue ``jobs`` (the parts of one request) together, or none of them: their results, in order."""
        loop = asyncio.get_running_loop()
        weight = sum(job.weight for job in jobs)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if self._pending + weight > self.max_pending:
                raise QueueFull(f"{self._pending} images are already waiting (limit {self.max_pending})")
            self._pending += weight
            now = time.perf_counter()
            for job in jobs:
                job.loop, job.future, job.queued_at = loop, loop.create_future(), now
                self._jobs.append(job)
            self._cond.notify()
        # Shielded: a client that disconnects does not cancel work the batch has already counted on.
        return list(await asyncio.shield(asyncio.gather(*(job.future for job in jobs))))

    def _take(self) -> list[_Job] | None:
        """The next exclusive job alone, or identify jobs with equal options gathered for up to max_wait."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._jobs:
                return None
            first = min(self._jobs, key=_Job.rank)
            self._jobs.remove(first)
            if first.call is not None:
                return [first]
            batch, images, pixels = [first], first.weight, first.pixels
            deadline = time.perf_counter() + self.max_wait
            while images < self.max_batch and pixels < self.max_batch_pixels:
                fits = next(
                    (
                        j
                        for j in sorted(self._jobs, key=_Job.rank)
                        if j.call is None and j.options == first.options and images + j.weight <= self.max_batch
                    ),
                    None,
                )
                if fits is not None:
                    self._jobs.remove(fits)
                    batch.append(fits)
                    images += fits.weight
                    pixels += fits.pixels
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            handed_on = False
            try:
                if batch[0].call is not None:
                    if batch[0].exclusive:
                        self._naming.join()  # alone: nothing is being named meanwhile
                    try:
                        results = [batch[0].call(self.recognizer)]
                    finally:  # even a failed call may have changed the recognizer
                        if self.on_change is not None:
                            self.on_change(self.recognizer)
                    for job, result in zip(batch, results):
                        self._settle(job, result, None)
                else:
                    started = time.perf_counter()
                    detected = self.recognizer.detect_batch([image for job in batch for image in job.images])
                    self._naming.put((batch, detected, started))
                    handed_on = True
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives
                for job in batch:
                    self._settle(job, None, exc)
            finally:
                if not handed_on:
                    self._done(batch)

    def _name_loop(self) -> None:
        while (item := self._naming.get()) is not None:
            batch, detected, started = item
            try:
                top_k, threshold, min_probability = batch[0].options
                results = self.recognizer.name_batch(detected, top_k, threshold, min_probability)
                if self.on_batch is not None:
                    self.on_batch(len(results), time.perf_counter() - started)
                lo = 0
                for job in batch:
                    self._settle(job, results[lo : lo + job.weight], None)
                    lo += job.weight
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives
                for job in batch:
                    self._settle(job, None, exc)
            finally:
                self._done(batch)
                self._naming.task_done()
        self._naming.task_done()

    def _done(self, batch: list[_Job]) -> None:
        with self._cond:
            self._pending -= sum(job.weight for job in batch)

    @staticmethod
    def _settle(job: _Job, result: Any, error: BaseException | None) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass
