"""SNS -> HTTP(S) webhook: Basic auth, SubscriptionConfirmation, and bodies that must be 400 not 500.

SNS delivers nothing to an HTTP(S) subscriber until the SubscribeURL of its SubscriptionConfirmation has
been visited. AWS cannot be reached from the tests, so the SNS-host check is tested as the pure function it
is, and the confirmation end to end against a local HTTP server allowed by an injected check.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
import uvicorn
from pydantic import SecretStr

from enrich.stack import free_port, minio_event
from ingest.publisher import JobPublisher
from ingest.webhook import is_sns_host, make_webhook_app, sns_subscribe_url_problem
from schema.settings import Settings
from tests.conftest import REDIS_URL, ServeWebhook, wait_for

SECRET = "correct horse battery staple"
TOPIC = "arn:aws:sns:us-east-1:123456789012:uploads"


@pytest.mark.parametrize(
    "host",
    [
        "sns.us-east-1.amazonaws.com",
        "sns.eu-central-1.amazonaws.com",
        "sns.ap-southeast-2.amazonaws.com",
        "sns.us-gov-west-1.amazonaws.com",
        "sns.cn-north-1.amazonaws.com.cn",
    ],
)
def test_sns_hosts_are_allowed(host: str) -> None:
    assert is_sns_host(host)
    assert sns_subscribe_url_problem(f"https://{host}/?Action=ConfirmSubscription&Token=t") is None


@pytest.mark.parametrize(
    "host",
    [
        "sns.amazonaws.com",
        "sqs.us-east-1.amazonaws.com",
        "sns.us-east-1.amazonaws.com.evil.example",
        "evil.example/sns.us-east-1.amazonaws.com",
        "xsns.us-east-1.amazonaws.com",
        "sns.us-east-1.amazonaws.co",
        "sns.us-east-1.amazonaws.com.",
        "127.0.0.1",
        "",
    ],
)
def test_other_hosts_are_not(host: str) -> None:
    assert not is_sns_host(host)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription", "not https"),
        ("https://evil.example/?Action=ConfirmSubscription", "host"),
        ("https://sns.us-east-1.amazonaws.com.evil.example/?Action=ConfirmSubscription", "host"),
        ("https://user@sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription", "host"),
        ("https://sns.us-east-1.amazonaws.com@evil.example/?Action=ConfirmSubscription", "host"),
        ("https://sns.us-east-1.amazonaws.com\\@evil.example/?Action=ConfirmSubscription", "host"),
        ("https://sns.us-east-1.amazonaws.com:8443/?Action=ConfirmSubscription", "host"),
        ("https://[sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription", "not a URL"),
        ("https://sns.us-east-1.amazonaws.com/?Action=Publish&Message=x", "not an SNS ConfirmSubscription"),
        ("https://sns.us-east-1.amazonaws.com/ ?Action=ConfirmSubscription", "non-printable"),
        ("https://sns.us-east-1.amazonaws.com/\n?Action=ConfirmSubscription", "non-printable"),
        ("file:///etc/passwd", "not https"),
    ],
)
def test_subscribe_urls_off_sns_are_refused_with_a_reason(url: str, why: str) -> None:
    problem = sns_subscribe_url_problem(url)
    assert problem is not None and why in problem
    assert (
        sns_subscribe_url_problem("https://SNS.us-east-1.amazonaws.com:443/?Action=ConfirmSubscription")
        is None
    )


class _FakeSns:
    """A local HTTP server standing in for sns.<region>.amazonaws.com: records the paths it was asked for."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/elsewhere?Action=ConfirmSubscription")
                    self.end_headers()
                    return
                self.send_response(500 if self.path.startswith("/broken") else 200)
                self.end_headers()
                self.wfile.write(b"<ConfirmSubscriptionResponse/>")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", free_port()), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def allows(self, url: str) -> str | None:
        return None if url.startswith(self.base + "/") else "not the fake SNS"


@pytest.fixture
def fake_sns() -> Iterator[_FakeSns]:
    sns = _FakeSns()
    yield sns
    sns.server.shutdown()
    sns.server.server_close()


ServeApp = Callable[..., str]


@pytest.fixture
def serve_app() -> Iterator[ServeApp]:
    """The real webhook app under uvicorn, with the confirmation's injectables (serve_webhook has none)."""
    servers: list[tuple[uvicorn.Server, threading.Thread, JobPublisher]] = []

    def serve(settings: Settings, **injected: object) -> str:
        publisher = JobPublisher(settings)
        app = make_webhook_app(settings, publisher, **injected)  # type: ignore[arg-type]
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, timeout=10, what="webhook start")
        servers.append((server, thread, publisher))
        return f"http://127.0.0.1:{port}/events"

    yield serve
    for server, thread, publisher in servers:
        server.should_exit = True
        thread.join(timeout=10)
        publisher.close()


@pytest.fixture
def secured(queue_name: str) -> Settings:
    return Settings(broker_url=REDIS_URL, queue=queue_name, webhook_secret=SecretStr(SECRET))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def confirmation(subscribe_url: str) -> bytes:
    """A SubscriptionConfirmation as SNS POSTs it (text/plain, JSON body)."""
    return json.dumps(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": "2336412f37",
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.\nTo confirm the subscription, "
            "visit the SubscribeURL included in this message.",
            "SubscribeURL": subscribe_url,
            "Timestamp": "2026-01-01T00:00:00.000Z",
            "SignatureVersion": "1",
        }
    ).encode()


SNS_HEADERS = {"x-amz-sns-message-type": "SubscriptionConfirmation", "content-type": "text/plain"}


def test_a_subscription_confirmation_visits_its_subscribe_url(
    secured: Settings, serve_app: ServeApp, fake_sns: _FakeSns
) -> None:
    url = serve_app(secured, subscribe_url_problem=fake_sns.allows)
    body = confirmation(f"{fake_sns.base}/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37")
    # SNS first asks without credentials; the 401 must carry a Basic challenge for it to send them.
    refused = httpx.post(url, content=body, headers=SNS_HEADERS)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert fake_sns.hits == []
    response = httpx.post(url, content=body, headers=SNS_HEADERS | basic("sns", SECRET))
    assert response.status_code == 200, response.text
    assert response.json() == {"confirmed": TOPIC}
    assert fake_sns.hits == [f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37"]


def test_a_subscribe_url_off_sns_is_never_visited(
    secured: Settings, serve_app: ServeApp, fake_sns: _FakeSns
) -> None:
    # The production check (the default): the local server is not sns.<region>.amazonaws.com.
    url = serve_app(secured)
    body = confirmation(f"{fake_sns.base}/?Action=ConfirmSubscription&Token=t")
    response = httpx.post(url, content=body, headers=SNS_HEADERS | basic("sns", SECRET))
    assert response.status_code == 400 and "not https" in response.json()["error"]
    assert fake_sns.hits == []


def test_a_failed_or_redirected_confirmation_is_a_5xx_for_sns_to_retry(
    secured: Settings, serve_app: ServeApp, fake_sns: _FakeSns
) -> None:
    url = serve_app(secured, subscribe_url_problem=fake_sns.allows)
    auth = SNS_HEADERS | basic("sns", SECRET)
    broken = httpx.post(url, content=confirmation(f"{fake_sns.base}/broken?Token=t"), headers=auth)
    assert broken.status_code == 502 and "answered 500" in broken.json()["error"]
    assert "Token" not in broken.text  # the token is the subscription's key: never echoed
    # A redirect is not followed: it would leave the host the check allowed.
    moved = httpx.post(url, content=confirmation(f"{fake_sns.base}/redirect?Token=t"), headers=auth)
    assert moved.status_code == 502 and "answered 302" in moved.json()["error"]
    assert fake_sns.hits == ["/broken?Token=t", "/redirect?Token=t"]
    unreachable = confirmation(f"http://127.0.0.1:{free_port()}/?Token=t")
    url = serve_app(secured, subscribe_url_problem=lambda _url: None)
    assert httpx.post(url, content=unreachable, headers=auth).status_code == 502


def test_basic_auth_takes_the_secret_as_password_and_sns_notifications_queue_objects(
    secured: Settings, serve_app: ServeApp
) -> None:
    url = serve_app(secured)
    notification = json.dumps(
        {"Type": "Notification", "TopicArn": TOPIC, "Message": json.dumps(minio_event("shop", "a.jpg", "e"))}
    ).encode()
    for headers in (
        basic("sns", "wrong"),
        basic("", SECRET[:-1]),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(SECRET.encode()).decode()},  # no user:password
    ):
        assert httpx.post(url, content=notification, headers=headers).status_code == 401, headers
    for headers in (
        basic("sns", SECRET),
        basic("", SECRET),
        {"authorization": basic("x", SECRET)["Authorization"].replace("Basic", "basic")},
    ):
        response = httpx.post(url, content=notification, headers=headers)
        assert response.status_code == 200 and response.json()["queued"] == 1
    assert redis.Redis.from_url(REDIS_URL).llen(secured.queue) == 3


def test_bodies_that_break_the_parser_or_no_row_can_hold_are_answered_not_500(
    secured: Settings, serve_webhook: ServeWebhook
) -> None:
    url = serve_webhook(secured) + "/events"
    auth = {"Authorization": f"Bearer {SECRET}"}
    nested = '{"Records": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = httpx.post(url, content=nested, headers=auth)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    # One record with a NUL in its key beside a good one: the good one is queued, the bad one answered.
    body = minio_event("shop", "good.jpg", "e")
    body["Records"].append(minio_event("shop", "bad%00.jpg", "e")["Records"][0])
    response = httpx.post(url, json=body, headers=auth)
    assert response.status_code == 200 and response.json()["queued"] == 1
    (reason,) = response.json()["ignored"]
    assert reason.startswith("Records[1]: key ") and "contains NUL" in reason
    metrics = httpx.get(url.removesuffix("/events") + "/metrics").text
    assert 'enrich_ingest_objects_total{outcome="ignored"} 1.0' in metrics
