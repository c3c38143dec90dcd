"""The server's Prometheus metrics, in a registry of its own (two servers in one process, as in
the tests, do not share counters).

With several worker processes (`--workers N`) each process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by `serve`), and
`/metrics` adds them up, so a scrape sees the whole server rather than whichever worker answered.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("visiontune_requests", "HTTP requests by model and status code",
                                ["model", "status"], registry=self.registry)
        self.errors = Counter("visiontune_errors", "Refused or failed requests by kind",
                              ["model", "kind"], registry=self.registry)
        self.images = Counter("visiontune_images", "Images predicted", ["model"], registry=self.registry)
        self.latency = Histogram("visiontune_request_latency_seconds", "Predict request latency, end to end",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("visiontune_batch_size", "Images per forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("visiontune_queue_depth", "Images waiting for a batch", ["model"],
                                 registry=self.registry, multiprocess_mode="livesum")

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
