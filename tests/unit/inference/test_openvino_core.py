"""One OpenVINO Core per process, even when threads load models at the same moment."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

from visiontune.inference import openvino as openvino_backend


def test_threads_loading_at_once_share_one_core(monkeypatch):
    made = []

    @functools.cache
    def slow_core():  # stands in for openvino.Core(), which takes milliseconds
        time.sleep(0.05)
        made.append(object())
        return made[-1]

    monkeypatch.setattr(openvino_backend, "_new_core", slow_core)
    with ThreadPoolExecutor(4) as pool:
        cores = list(pool.map(lambda _: openvino_backend.shared_core(), range(4)))
    assert len(made) == 1 and all(core is made[0] for core in cores)
