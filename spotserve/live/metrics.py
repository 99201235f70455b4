"""Prometheus metrics of a live service, on its own registry (several services can share a process)."""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters and histograms updated as things happen; gauges refreshed at scrape time."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue = Gauge("spotserve_queue_length", "Requests waiting for a replica", registry=r)
        self.running = Gauge("spotserve_running_requests", "Requests in running batches", registry=r)
        self.tokens_per_s = Gauge("spotserve_tokens_per_second", "Committed tokens per second (last 10 s)",
                                  registry=r)
        self.config = Gauge("spotserve_config", "Parallel config now served (value 1)",
                            ["dp", "pp", "tp", "batch"], registry=r)
        self.instances = Gauge("spotserve_instances", "Instances held, by state", ["state"], registry=r)
        self.tokens = Counter("spotserve_tokens", "Output tokens committed", registry=r)
        self.requests = Counter("spotserve_requests", "Requests by fate", ["fate"], registry=r)
        self.reconfigurations = Counter("spotserve_reconfigurations", "Configurations applied after the first",
                                        registry=r)
        self.migration_bytes = Counter("spotserve_migration_bytes",
                                       "Weight and KV cache bytes workers received from other workers in "
                                       "migrations", registry=r)
        self.disk_bytes = Counter("spotserve_checkpoint_bytes", "Weight bytes read from the checkpoint",
                                  registry=r)
        self.migration_seconds = Counter("spotserve_migration_seconds", "Seconds spent configuring workers",
                                         registry=r)
        self.preemptions = Counter("spotserve_preemptions", "Instances lost", ["kind"], registry=r)
        self.latency = Histogram("spotserve_request_latency_seconds", "Arrival to last token",
                                 buckets=_LAT_BUCKETS, registry=r)
        self.ttft = Histogram("spotserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LAT_BUCKETS, registry=r)
        self.token_gap = Histogram("spotserve_token_gap_seconds", "Gap between consecutive tokens of a request",
                                   buckets=_LAT_BUCKETS, registry=r)
        self._recent: deque[float] = deque()

    def token(self, now: float) -> None:
        self.tokens.inc()
        self._recent.append(now)

    def refresh(self, queue: int, running: int, config, instance_states: dict[str, int]) -> None:
        now = time.time()
        while self._recent and self._recent[0] < now - 10:
            self._recent.popleft()
        self.tokens_per_s.set(len(self._recent) / 10.0)
        self.queue.set(queue)
        self.running.set(running)
        self.config.clear()
        if config is not None:
            self.config.labels(str(config.dp), str(config.pp), str(config.tp), str(config.batch)).set(1)
        self.instances.clear()
        for state, n in instance_states.items():
            self.instances.labels(state).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
