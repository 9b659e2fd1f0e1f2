"""An S3 client from settings, for AWS, MinIO or moto alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from schema.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient


def _credentials(settings: Settings) -> dict[str, Any]:
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        return {
            "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
    return {}  # boto3's own chain: AWS_* variables, mounted profile, instance role


def make_s3_client(settings: Settings, *, session: boto3.session.Session | None = None) -> S3Client:
    return (session or boto3.session.Session()).client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            # One pool slot per fetch thread, so fetches never queue for a connection.
            max_pool_connections=max(10, settings.fetch_threads * 2),
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        ),
        **_credentials(settings),
    )


def make_sqs_client(settings: Settings) -> SQSClient:
    return boto3.session.Session().client(
        "sqs",
        endpoint_url=settings.sqs_endpoint_url,
        region_name=settings.s3_region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, read_timeout=30),
        **_credentials(settings),
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, prefix
