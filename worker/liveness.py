"""A worker's HTTP endpoint: Prometheus metrics on `/metrics` and its liveness on `/healthz`.

A process that is up and serving metrics may still do no work: a GPU call that never returns, a database
that holds a lock the batch waits on, a deadlock. Its messages come back to other workers after the
visibility timeout, but the pod goes on counting as a replica, so the fleet is smaller than KEDA thinks.
`/healthz` answers 503 once a worker process has held work for `ENRICH_STALL_LIMIT_S` without finishing
any of it (a finished job includes a failed or retried one: an S3 or database outage is progress), and
Kubernetes' liveness probe restarts the pod.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

STALLED = "enrich_stalled_seconds"


def watch_stalls(stalled_s: Callable[[], float], gauge: Gauge, every_s: float = 1.0) -> None:
    """Copies a process's stall into its gauge, which the supervisor of several processes reads from
    their shared files: a gauge set on a thread, since a callback cannot cross processes."""

    def loop() -> None:
        while True:
            gauge.set(stalled_s())
            time.sleep(every_s)

    threading.Thread(target=loop, name="enrich-stall-watch", daemon=True).start()


def serve(port: int, registry: CollectorRegistry, stall_limit_s: float) -> None:
    """Serves both paths on `port` from a daemon thread (nothing when `port` is 0)."""
    if not port:
        return
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics(environ, start_response)
        stalled = registry.get_sample_value(STALLED) or 0.0
        if stalled > stall_limit_s:
            status, body = "503 Service Unavailable", f"stalled: work held {stalled:.0f} s without progress\n"
        else:
            status, body = "200 OK", "ok\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    server = make_server("", port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="enrich-metrics", daemon=True).start()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per probe or scrape."""
