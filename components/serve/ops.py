"""The served endpoint's gate and gauges: Host allowlist, header limit, API key, JSON Content-Type (a pure ASGI
middleware, so streams and client-disconnect cancellation pass through untouched), and the replica's Prometheus
metrics."""

import hmac
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from components.serve.protocol import APIError

OPEN_PATHS = {"/health"}  # answered without the API key (load balancers probe it); it tells nothing secret
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}  # metric labels


class Metrics:
    """This replica's counters (a registry of its own; Ray Serve's cluster-wide metrics are beside them)."""

    def __init__(self, replica: str):
        self.registry = r = CollectorRegistry()
        labels = {"replica": replica}
        self.requests = Counter("llama2_serve_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r).labels
        self.tokens = Counter("llama2_serve_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("llama2_serve_cancelled", "requests whose client left before the end", registry=r)
        self.ttft = Histogram("llama2_serve_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        Gauge("llama2_serve_replica_info", "this replica", list(labels), registry=r).labels(**labels).set(1)

    def watch_engine(self, stats: Callable, max_batch_size: int) -> None:
        """Export the engine's queue, batch and counters, read from stats() (an EngineStats) at each scrape."""
        self.registry.register(_EngineCollector(stats, max_batch_size))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, stats: Callable, max_batch_size: int):
        self.stats, self.max_batch_size = stats, max_batch_size

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("llama2_serve_queue_depth", "rows (choices) waiting for a place in the batch",
                                value=s.queued)
        yield GaugeMetricFamily("llama2_serve_running_rows", "rows in the running decode batch", value=s.running)
        yield GaugeMetricFamily("llama2_serve_batch_occupancy", "running rows / max_batch_size",
                                value=s.running / self.max_batch_size)
        for name, help_, value in (("engine_tokens", "tokens the engine generated", s.tokens),
                                   ("engine_steps", "batched decode steps (tokens / steps: mean occupancy)", s.steps),
                                   ("engine_prefills", "prefill calls", s.prefills),
                                   ("engine_rows_failed", "rows failed alone", s.failed),
                                   ("engine_rows_cancelled", "rows cancelled", s.cancelled)):
            yield CounterMetricFamily(f"llama2_serve_{name}", help_, value=value)


class Guard:
    """The per-replica settings the middleware checks (set on the app's state by the replica)."""

    def __init__(self, allowed_hosts: list[str], api_key: str | None, max_header_bytes: int, metrics: Metrics):
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.api_key = api_key.encode() if api_key else None
        self.max_header_bytes, self.metrics = max_header_bytes, metrics

    def check(self, scope: dict) -> APIError | None:
        headers = scope["headers"]
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            return APIError(431, f"request headers exceed {self.max_header_bytes} bytes",
                            code="request_header_fields_too_large")
        values: dict[bytes, bytes] = {}
        for k, v in headers:
            values.setdefault(k, v)
        host = values.get(b"host", b"").decode("latin-1").lower()
        hostname = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if not self.any_host and hostname not in self.allowed_hosts:
            # DNS rebinding: a web page whose name points at 127.0.0.1 must not reach the model.
            return APIError(421, f"the Host header {host[:100]!r} is not served here (allowed_hosts)",
                            code="misdirected_request")
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = values.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", type="auth_error",
                                code="invalid_api_key")
        if scope["method"] == "POST":
            media_type = values.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                return APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
        return None


_guard: Guard | None = None  # this process's (one replica per process); Serve runs a copy of the app, not `api`


def install(guard: Guard) -> None:
    """Make `guard` the one GuardMiddleware checks (the replica calls it when it starts)."""
    global _guard
    _guard = guard


class GuardMiddleware:
    """Refuses what the installed Guard refuses, and counts every answer by route and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        guard = _guard
        if scope["type"] != "http" or guard is None:
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (error := guard.check(scope)) is not None:
                return await error.response()(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            guard.metrics.requests(route=route, status=str(status[0])).inc()
