"""The worker's S3 GET (obstore, worker/s3_get.py) against the real moto server: what it returns, how each
failure is classed (permanent -> a failed row, transient -> a retry), and the boto3 fallback for the keys
obstore cannot name."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schema.results import ObjectRef
from schema.s3 import make_s3_client
from schema.settings import Settings
from worker.storage import FetchError, LimitError, S3Store


@pytest.fixture
def store(settings: Settings) -> S3Store:
    s3 = S3Store.from_settings(settings)
    assert s3._fast is not None  # the obstore path is the one under test
    return s3


def test_a_get_returns_the_bytes_and_the_identity_the_server_gives(
    settings: Settings, bucket: str, store: S3Store
) -> None:
    client = make_s3_client(settings)
    put = client.put_object(Bucket=bucket, Key="new arrivals/café + tie?.jpg", Body=b"jpeg bytes")
    etag = put["ETag"].strip('"')
    got = store.get(ObjectRef(bucket, "new arrivals/café + tie?.jpg", etag=etag), max_bytes=1000)
    assert (got.data, got.size, got.etag, got.version_id) == (b"jpeg bytes", 10, etag, None)
    assert got.last_modified is not None and got.last_modified.tzinfo is not None


def test_a_versioned_get_fetches_the_named_version_not_the_latest(
    settings: Settings, bucket: str, store: S3Store
) -> None:
    client = make_s3_client(settings)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=bucket, Key="a.jpg", Body=b"first")["VersionId"]
    client.put_object(Bucket=bucket, Key="a.jpg", Body=b"second")
    got = store.get(ObjectRef(bucket, "a.jpg", version_id=first), max_bytes=1000)
    assert (got.data, got.version_id) == (b"first", first)


def test_missing_objects_and_overwrites_are_permanent_failures_named_by_s3s_code(
    settings: Settings, bucket: str, store: S3Store
) -> None:
    client = make_s3_client(settings)
    client.put_object(Bucket=bucket, Key="overwritten.jpg", Body=b"new bytes")
    cases = {
        "NoSuchKey": ObjectRef(bucket, "gone.jpg"),
        "NoSuchBucket": ObjectRef("no-such-bucket-here", "x.jpg"),
        "changed since the event": ObjectRef(bucket, "overwritten.jpg", etag="0123456789abcdef"),
    }
    for expected, ref in cases.items():
        with pytest.raises(FetchError) as raised:
            store.get(ref, max_bytes=1000)
        assert expected in str(raised.value) and not raised.value.transient, str(raised.value)
        assert "<?xml" not in str(raised.value)  # the reason, not the server's whole answer


def test_an_object_over_the_limit_is_refused_by_its_size(
    settings: Settings, bucket: str, store: S3Store
) -> None:
    make_s3_client(settings).put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 2000)
    with pytest.raises(LimitError, match="2000 bytes, over the limit of 1000"):
        store.get(ObjectRef(bucket, "big.jpg"), max_bytes=1000)


def test_a_key_obstore_cannot_name_is_fetched_by_boto3(
    settings: Settings, bucket: str, store: S3Store
) -> None:
    # S3 allows empty and dot segments; obstore's paths do not (they would be a ValueError).
    client = make_s3_client(settings)
    # A leading or doubled "/" would even be dropped: this must not read "leading.jpg" or "a/b.jpg".
    for decoy in ("leading.jpg", "a/b.jpg"):
        client.put_object(Bucket=bucket, Key=decoy, Body=b"another object")
    for key in ("a//b.jpg", "dir/./c.jpg", "dir/../d.jpg", "/leading.jpg", "trailing.jpg/"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert store.get(ObjectRef(bucket, key), max_bytes=1000).data == key.encode()


class _Answer503(BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server_503() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_error_is_retried_then_transient(settings: Settings, server_503: str) -> None:
    store = S3Store.from_settings(settings.model_copy(update={"s3_endpoint_url": server_503}))
    _Answer503.calls = 0
    with pytest.raises(FetchError) as raised:
        store.get(ObjectRef("shop", "x.jpg"), max_bytes=1000)
    assert raised.value.transient and "SlowDown" in str(raised.value)
    assert _Answer503.calls == 3  # three attempts, as boto3's standard mode made


def test_an_unreachable_server_is_transient(settings: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = S3Store.from_settings(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{port}"}))
    with pytest.raises(FetchError) as raised:
        store.get(ObjectRef("shop", "x.jpg"), max_bytes=1000)
    assert raised.value.transient
