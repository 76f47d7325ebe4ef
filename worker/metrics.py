"""The worker's Prometheus metrics, served by each node's main process on SER_WORKER_METRICS_PORT.

The pool children do the work and count it; the main process serves. With the prefork pool they
are different processes, so ``ser worker`` points ``PROMETHEUS_MULTIPROC_DIR`` at a folder of its
own (cleared at start) before the worker imports prometheus_client: the children write their
values there and a scrape of the main process adds them up (``MultiProcessCollector``). Without
the variable (the solo pool, the tests' in-process workers) the process's own registry is served.

Stage timings come from the pipeline's ``outcome.timings_ms``: they are observed here, so the
numeric package stays free of service concerns. The queue depth is read from Redis at scrape time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ser_ml.pipeline import Outcome
from ser_shared.contracts import QUEUES
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

STAGES = ("decode", "vad", "features", "inference")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS_FINISHED = Counter("ser_jobs_finished_total", "Jobs a worker finished, by status and error code",
                        ["status", "error_code"])
STAGE_SECONDS = Histogram("ser_stage_duration_seconds", "Time one recording spent in a pipeline stage",
                          ["stage"], buckets=STAGE_BUCKETS)
CHUNK_RECORDINGS = Histogram("ser_chunk_recordings", "Recordings analysed per task (chunk)",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
WEBHOOK_DELIVERIES = Counter("ser_webhook_deliveries_total", "Webhook delivery attempts, by outcome",
                             ["outcome"])


def job_finished(status: str, error_code: str | None = None, count: int = 1) -> None:
    if count:
        JOBS_FINISHED.labels(status, error_code or "").inc(count)


def observe_chunk(outcomes: Sequence[Outcome]) -> None:
    """A chunk's size and each recording's stage timings."""
    CHUNK_RECORDINGS.observe(len(outcomes))
    for outcome in outcomes:
        for stage in STAGES:
            ms = outcome.timings_ms.get(stage)
            if ms is not None:
                STAGE_SECONDS.labels(stage).observe(ms / 1000)


def observe_transcript(started: float) -> None:
    """One recording's transcript stage, begun at ``started`` (``time.perf_counter()``)."""
    STAGE_SECONDS.labels("transcript").observe(time.perf_counter() - started)


def webhook_attempt(outcome: str) -> None:
    """``outcome``: the delivery's state after the attempt (delivered, pending: to retry, failed)."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()


class QueueDepth(Collector):
    """``ser_queue_depth{queue}``: messages waiting in each Redis queue, read at scrape time."""

    def __init__(self, broker_url: str, queues: Sequence[str]) -> None:
        self.broker_url, self.queues = broker_url, list(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import redis

        family = GaugeMetricFamily("ser_queue_depth", "Messages waiting in the broker, by queue", labels=["queue"])
        try:
            client = redis.Redis.from_url(self.broker_url, socket_timeout=2)
            try:
                for queue in self.queues:
                    family.add_metric([queue], float(client.llen(queue)))
            finally:
                client.close()
        except redis.RedisError as exc:
            log.warning("queue depth not read: %s", exc)
            return
        yield family


def serve(settings: Settings) -> None:
    """Serve this node's metrics on ``settings.worker_metrics_port`` (main process; no-op without a port)."""
    port = settings.worker_metrics_port
    if port is None:
        return
    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    if settings.queue_url.startswith("redis"):
        registry.register(QueueDepth(settings.queue_url, sorted({*QUEUES, settings.default_queue})))
    start_http_server(port, registry=registry)
    log.info("metrics served port=%d", port)
