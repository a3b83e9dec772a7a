"""Local paths and URIs (file://, s3://, gs://, hdfs://) through pyarrow.fs.

S3-compatible stores (MinIO, moto, Ceph...) are reached through the standard AWS
variables: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:9000`),
with credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. A URI can also
name its endpoint itself: `s3://bucket/ds?endpoint_override=host:9000&scheme=http`.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from .manifest import MANIFEST_NAME, DatasetError, Manifest

# Checked in this order, as the AWS SDKs and CLI do: the service-specific one wins.
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _with_endpoint(uri: str) -> str:
    """`uri` with the endpoint from the environment spelled out in its query.

    Recent pyarrow reads these variables in `from_uri` itself, but not every version
    does, and `S3FileSystem()` never does (apache/arrow#49643); passing it explicitly
    also stops pyarrow from asking AWS for the bucket's region, which a private
    endpoint cannot answer."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if parts.scheme != "s3" or "endpoint_override" in query or not endpoint:
        return uri
    ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.setdefault("endpoint_override", ep.netloc)
    query.setdefault("scheme", ep.scheme)
    return parts._replace(query=urlencode(query)).geturl()


def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it; local relative paths become absolute."""
    if "://" not in path_or_uri:
        return pafs.LocalFileSystem(), os.path.abspath(path_or_uri)
    try:
        fs, path = pafs.FileSystem.from_uri(_with_endpoint(path_or_uri))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path_or_uri}: cannot open this URI ({exc}); use a local path "
                           "or file://, s3://, gs://, hdfs://") from None
    return fs, path.rstrip("/") or path


def join(base: str, name: str) -> str:
    """`name` inside directory `base` (pyarrow.fs paths always use '/')."""
    return f"{base.rstrip('/')}/{name}"


def display_join(where: str, name: str) -> str:
    """`name` inside the dataset the user named as `where` (a path or URI), for messages."""
    head, sep, query = where.partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


def read_manifest(fs: pafs.FileSystem, base: str, where: str | None = None) -> Manifest:
    path = join(base, MANIFEST_NAME)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DatasetError(f"{where or base}: no {MANIFEST_NAME}; "
                           "create the dataset with 'trainctl data shard'")
    with fs.open_input_stream(path) as f:
        # a binary file reads as invalid JSON (one DatasetError line), not a UnicodeDecodeError
        return Manifest.from_json(f.read().decode(errors="replace"), display_join(where or base, MANIFEST_NAME))


def write_bytes_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or all of `data`, never part of it.

    A rename on a local disk; on object stores the copy behind `move` makes the
    object appear whole, which is the same guarantee."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    try:
        fs.move(tmp, path)
    except BaseException:
        fs.delete_file(tmp)
        raise
