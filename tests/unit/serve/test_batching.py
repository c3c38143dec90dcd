"""Dynamic batching: images that arrive together share a forward pass, the queue is bounded, and
a failing batch fails only its own requests."""

from __future__ import annotations

import asyncio

import pytest
import torch

from visiontune.serve.batching import Batcher, QueueFull
from visiontune.serve.metrics import ServerMetrics
from visiontune.serve.models import Decoded, Prediction


class CountingModel:
    """Records each batch's size; image i's answer is its first pixel, so order is checked too."""

    name = "fake"

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[int] = []
        self.fail_first = fail_first

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors)

    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        self.batches.append(len(batch))
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("out of memory")
        return [Prediction({"value": float(image[0, 0, 0]), "top_k": top_k}) for image in batch]


def image(value: float) -> Decoded:
    return Decoded(torch.full((3, 2, 2), value))


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_arriving_together_share_batches_of_at_most_max_batch_size() -> None:
    model = CountingModel()

    async def scenario():
        batcher = Batcher(model, ServerMetrics(), max_batch_size=4, timeout_s=0.05, max_queue=100)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(image(i), top_k=2) for i in range(10)))
        finally:
            await batcher.stop()

    answers = run(scenario())
    assert [a.body["value"] for a in answers] == list(range(10))  # each request gets its own image's answer
    assert model.batches == [4, 4, 2]


def test_a_lone_request_waits_only_the_batch_timeout() -> None:
    model = CountingModel()

    async def scenario():
        batcher = Batcher(model, ServerMetrics(), max_batch_size=8, timeout_s=0.01, max_queue=10)
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await batcher.submit(image(1), top_k=1)
            return loop.time() - started
        finally:
            await batcher.stop()

    assert run(scenario()) < 1.0
    assert model.batches == [1]


def test_a_full_queue_refuses_at_once_instead_of_growing() -> None:
    model = CountingModel()

    async def scenario():
        batcher = Batcher(model, ServerMetrics(), max_batch_size=2, timeout_s=0.01, max_queue=3)
        # not started: nothing drains the queue, so the fourth image finds it full
        waiting = [asyncio.ensure_future(batcher.submit(image(i), top_k=1)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(image(3), top_k=1)
        batcher.start()
        try:
            return await asyncio.gather(*waiting)
        finally:
            await batcher.stop()

    assert [a.body["value"] for a in run(scenario())] == [0, 1, 2]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs() -> None:
    model = CountingModel(fail_first=True)

    async def scenario():
        batcher = Batcher(model, ServerMetrics(), max_batch_size=8, timeout_s=0.01, max_queue=10)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                await batcher.submit(image(1), top_k=1)
            return await batcher.submit(image(2), top_k=1)
        finally:
            await batcher.stop()

    assert run(scenario()).body["value"] == 2
    assert model.batches == [1, 1]
