"""`enrich ingest webhook`: an HTTP endpoint for S3 event notifications (MinIO webhook target, SNS).

POST /events with the event JSON. Answers 2xx only once every object is on the queue, so the sender
retries on a broker outage (503); a body we cannot understand is a 400 that names the problem and is
never worth retrying.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ingest.publisher import JobPublisher
from schema.events import EventParseError, parse_event_body
from schema.settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "x-enrich-signature"


class _BodyTooLarge(Exception):
    pass


def make_webhook_app(settings: Settings, publisher: JobPublisher) -> Starlette:
    registry = CollectorRegistry()
    requests_total = Counter(
        "enrich_webhook_requests", "Webhook requests by outcome", ["outcome"], registry=registry
    )
    objects_total = Counter("enrich_ingest_objects", "Objects by outcome", ["outcome"], registry=registry)

    async def events(request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            return PlainTextResponse("ok")  # MinIO probes the endpoint when the target is configured
        try:
            body = await _read_limited(request, settings.webhook_max_body_bytes)
        except _BodyTooLarge:
            requests_total.labels("too_large").inc()
            return _error(413, f"body over {settings.webhook_max_body_bytes} bytes")
        if not _authorized(settings, request, body):
            requests_total.labels("unauthorized").inc()
            return _error(401, "missing or wrong shared secret / signature")
        try:
            parsed = parse_event_body(body)
        except EventParseError as error:
            requests_total.labels("malformed").inc()
            return _error(400, str(error))
        try:
            # Publishing blocks on Redis: keep it off the event loop.
            report = await run_in_threadpool(publisher.publish, parsed.refs)
        except Exception as error:
            log.exception("publishing failed")
            requests_total.labels("broker_unavailable").inc()
            return _error(503, f"queue unavailable: {type(error).__name__}")
        requests_total.labels("accepted").inc()
        objects_total.labels("queued").inc(report.published)
        objects_total.labels("rejected").inc(len(report.rejected))
        objects_total.labels("ignored").inc(len(parsed.ignored))
        return JSONResponse(
            {"queued": report.published, "rejected": report.rejected, "ignored": parsed.ignored}
        )

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/events", events, methods=["POST", "GET", "HEAD"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ]
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _authorized(settings: Settings, request: Request, body: bytes) -> bool:
    """A bearer token (MinIO's auth_token) or an HMAC-SHA256 of the body; both compared in constant time."""
    if settings.webhook_secret is None:
        return True
    secret = settings.webhook_secret.get_secret_value().encode()
    authorization = request.headers.get("authorization", "")
    if authorization.startswith("Bearer ") and hmac.compare_digest(authorization[7:].encode(), secret):
        return True
    signature = request.headers.get(SIGNATURE_HEADER, "")
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return bool(signature) and hmac.compare_digest(signature.encode(), expected.encode())


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
