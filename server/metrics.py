"""Prometheus metrics of one server process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STORE_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .5)


class Metrics:
    def __init__(self, count_sessions: bool = True):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deltamem_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("deltamem_errors", "errors by kind", ["kind"], registry=r)
        self.tokens = Counter("deltamem_tokens", "tokens by kind: prompt, prompt_cached (served "
                              "from the prefix cache), completion", ["kind"], registry=r)
        self.latency = Histogram("deltamem_request_seconds", "request latency", ["endpoint"],
                                 registry=r)
        self.ttft = Histogram("deltamem_time_to_first_token_seconds", "time to first token",
                              registry=r)
        self.state_load = Histogram("deltamem_state_load_seconds", "session load latency",
                                    buckets=_STORE_BUCKETS, registry=r)
        self.state_commit = Histogram("deltamem_state_commit_seconds",
                                      "session commit latency", buckets=_STORE_BUCKETS,
                                      registry=r)
        # Only on a server without API keys: with keys, the count covers every tenant.
        self.sessions = Gauge("deltamem_sessions", "sessions in the store",
                              registry=r) if count_sessions else None
        self.turns = Counter("deltamem_turns", "committed session turns", registry=r)
        self.in_flight = Gauge("deltamem_requests_in_flight", "chat requests running",
                               registry=r)
