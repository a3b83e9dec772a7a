"""Local paths and URIs (s3://, gs://, hdfs://, file://) through pyarrow.fs."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from .manifest import MANIFEST_NAME, DatasetError, Manifest


def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path_or_uri:
        return pafs.FileSystem.from_uri(path_or_uri)
    return pafs.LocalFileSystem(), os.path.abspath(path_or_uri)


def read_manifest(fs: pafs.FileSystem, base: str) -> Manifest:
    path = f"{base.rstrip('/')}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DatasetError(f"{base}: no {MANIFEST_NAME}; create the dataset with 'trainctl data shard'")
    with fs.open_input_stream(path) as f:
        return Manifest.from_json(f.read().decode(), path)
