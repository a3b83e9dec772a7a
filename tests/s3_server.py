"""A real S3-compatible HTTP server (moto's) on 127.0.0.1, for S3 round trips without AWS.

Use the fixture from a test module with

    from .s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

It starts a fresh server per test, points the standard AWS variables at it (fake
credentials, `AWS_ENDPOINT_URL`) and creates the bucket `BUCKET`; the test then uses
`s3://trainctl-test/...` URIs like any other path.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "trainctl-test"


def _reset(endpoint: str) -> None:
    # moto keeps its buckets in process-wide state that outlives a server: without a
    # reset the next test's "fresh" server would still hold this test's objects.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    direct.open(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()


@contextmanager
def moto_s3() -> Iterator[str]:
    """A standalone moto server on a free loopback port, empty; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        _reset(endpoint)
        yield endpoint
        _reset(endpoint)
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path) -> Iterator[str]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("boto3", reason="needs boto3 (the dev extra)")
    with moto_s3() as endpoint:
        # Only fake credentials and this endpoint: never the user's ~/.aws or real AWS.
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                           "AWS_EC2_METADATA_DISABLED": "true",
                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                           "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
