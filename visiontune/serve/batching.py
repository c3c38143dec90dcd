"""Dynamic batching: images that arrive together share one forward pass.

Each model has one pending list and one inference thread. A batch closes when it holds
`max_batch_size` images or `timeout_s` after its first image arrived; while a batch runs, the
next one fills, so under load batches grow by themselves and at low load an image waits at most
`timeout_s`. The list is bounded: past `max_queue` waiting images `submit` raises `QueueFull`
at once (the server answers 503), instead of holding every request until memory runs out.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


from visiontune.serve.metrics import ServerMetrics
from visiontune.serve.models import Decoded, Prediction, ServedModel


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass
class _Job:
    decoded: Decoded
    top_k: int
    future: asyncio.Future


class Batcher:
    def __init__(self, model: ServedModel, metrics: ServerMetrics, max_batch_size: int = 8,
                 timeout_s: float = 0.002, max_queue: int = 256) -> None:
        self.model, self.metrics = model, metrics
        self.max_batch_size, self.timeout_s, self.max_queue = max_batch_size, timeout_s, max_queue
        self._pending: collections.deque[_Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, decoded: Decoded, top_k: int) -> Prediction:
        if len(self._pending) >= self.max_queue:
            raise QueueFull
        job = _Job(decoded, top_k, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self.metrics.queue_depth.labels(self.model.name).set(len(self._pending))
        self._arrived.set()
        return await job.future

    async def run_in_inference_thread(self, function, *args):
        """Work that must not run beside a batch of the same model (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _run(self) -> None:
        while True:
            jobs = await self._next_batch()
            self.metrics.queue_depth.labels(self.model.name).set(len(self._pending))
            if not jobs:
                continue
            self.metrics.batch_size.labels(self.model.name).observe(len(jobs))
            batch = self.model.collate([job.decoded.tensor for job in jobs])
            try:
                results = await self.run_in_inference_thread(self.model.predict, batch, max(j.top_k for j in jobs))
            except Exception as exc:  # noqa: BLE001 - the requests fail (500), the server and the next batch do not
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    async def _next_batch(self) -> list[_Job]:
        """Wait for a first image, then up to `timeout_s` for the batch to fill."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        jobs = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
        return [job for job in jobs if not job.future.cancelled()]  # clients that gave up
