"""`enrich ingest webhook`: an HTTP endpoint for S3 event notifications (MinIO webhook target, SNS).

POST /events with the event JSON. Answers 2xx only once every object is on the queue, so the sender
retries on a broker outage (503); a body we cannot understand is a 400 that names the problem and is
never worth retrying. An SNS HTTP(S) subscription is confirmed here: SNS delivers nothing until the
SubscribeURL of its SubscriptionConfirmation has been visited.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ingest.publisher import JobPublisher
from schema.events import EventParseError, SnsSubscription, parse_event_body
from schema.settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "x-enrich-signature"
# SNS sends its credentials (from the user:password@ of the subscribed URL) only after a 401 that asks.
AUTH_CHALLENGE = {"WWW-Authenticate": 'Basic realm="enrich"'}
# sns.us-east-1.amazonaws.com, sns.us-gov-west-1.amazonaws.com, sns.cn-north-1.amazonaws.com.cn
_SNS_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-[0-9]+\.amazonaws\.com(?:\.cn)?")
SUBSCRIBE_TIMEOUT_S = 5.0

# url -> why it must not be visited, None when it may; url -> the HTTP status of a GET (raises on no answer).
SubscribeUrlCheck = Callable[[str], str | None]
HttpGet = Callable[[str], int]


class _BodyTooLarge(Exception):
    pass


def make_webhook_app(
    settings: Settings,
    publisher: JobPublisher,
    *,
    subscribe_url_problem: SubscribeUrlCheck | None = None,
    http_get: HttpGet | None = None,
) -> Starlette:
    """`subscribe_url_problem` and `http_get` exist for tests, which cannot reach AWS: production keeps the
    strict SNS-host check and the short, redirect-less GET."""
    check_url = subscribe_url_problem or sns_subscribe_url_problem
    get = http_get or get_status
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
            return _error(401, "missing or wrong shared secret / signature", headers=AUTH_CHALLENGE)
        try:
            parsed = parse_event_body(body)
        except EventParseError as error:
            requests_total.labels("malformed").inc()
            return _error(400, str(error))
        if parsed.subscription is not None:
            # The GET blocks: keep it off the event loop.
            outcome, response = await run_in_threadpool(confirm, parsed.subscription)
            requests_total.labels(outcome).inc()
            return response
        for reason in parsed.ignored:
            log.info("ignored %s", reason)
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

    def confirm(subscription: SnsSubscription) -> tuple[str, Response]:
        problem = check_url(subscription.subscribe_url)
        if problem is not None:
            log.warning("refused to confirm SNS subscription to %s: %s", subscription.topic_arn, problem)
            return "subscription_refused", _error(400, problem)
        # Never the whole URL in a reply or a log line: it holds the subscription's token.
        host = _host_of(subscription.subscribe_url)
        try:
            status = get(subscription.subscribe_url)
        except (OSError, HTTPException, ValueError) as error:  # no answer: refused, timed out, garbled
            log.warning("confirming SNS subscription to %s failed: %r", subscription.topic_arn, error)
            # 5xx: SNS retries the confirmation, so a passing network fault does not lose the subscription.
            return "subscription_failed", _error(502, f"GET SubscribeURL on {host}: {type(error).__name__}")
        if not 200 <= status < 300:
            log.warning("SNS answered %d to the SubscribeURL of %s", status, subscription.topic_arn)
            return "subscription_failed", _error(502, f"GET SubscribeURL on {host} answered {status}")
        log.info("confirmed SNS subscription to %s", subscription.topic_arn)
        return "subscription_confirmed", JSONResponse({"confirmed": subscription.topic_arn})

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
    """A bearer token (MinIO's auth_token), HTTP Basic auth whose password is the secret (SNS, which sends
    the user:password@ of its endpoint URL and no other header), or an HMAC-SHA256 of the body; all compared
    in constant time."""
    if settings.webhook_secret is None:
        return True
    secret = settings.webhook_secret.get_secret_value().encode()
    authorization = request.headers.get("authorization", "")
    if authorization.startswith("Bearer ") and hmac.compare_digest(authorization[7:].encode(), secret):
        return True
    password = _basic_password(authorization)
    if password is not None and hmac.compare_digest(password, secret):
        return True
    signature = request.headers.get(SIGNATURE_HEADER, "")
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return bool(signature) and hmac.compare_digest(signature.encode(), expected.encode())


def _basic_password(authorization: str) -> bytes | None:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":  # auth schemes are case-insensitive (RFC 9110)
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    _user, colon, password = decoded.partition(b":")
    return password if colon else None


def is_sns_host(host: str) -> bool:
    """sns.<region>.amazonaws.com (or .com.cn): the only hosts a SubscribeURL may send us to."""
    return _SNS_HOST.fullmatch(host) is not None


def sns_subscribe_url_problem(url: str) -> str | None:
    """Why `url` must not be visited, or None. The body is the sender's: without this, anyone holding the
    secret could make ingest GET any address its network reaches."""
    if not url.isascii() or not url.isprintable() or " " in url:
        return "SubscribeURL has non-printable or non-ASCII characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "SubscribeURL is not a URL"
    if parts.scheme != "https":
        return f"SubscribeURL scheme {parts.scheme or '<none>'!r} is not https"
    host = parts.netloc.lower().removesuffix(":443")
    # The whole netloc must be the host: no user@, no other port, nothing two URL parsers could read apart.
    if not is_sns_host(host):
        return f"SubscribeURL host {parts.netloc!r} is not sns.<region>.amazonaws.com"
    if parse_qs(parts.query).get("Action") != ["ConfirmSubscription"]:
        return "SubscribeURL is not an SNS ConfirmSubscription"
    return None


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect would leave the host the check allowed: answered as the 3xx it is, never followed.
    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def get_status(url: str) -> int:
    """GET `url` within SUBSCRIBE_TIMEOUT_S; its status (raises on no answer)."""
    try:
        with _OPENER.open(url, timeout=SUBSCRIBE_TIMEOUT_S) as response:
            response.read(64 * 1024)
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
