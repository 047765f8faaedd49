"""Folders to and from S3 prefixes through a boto3 client, as ``aws s3 cp --recursive`` does.

A leaf: the workflow and the local CodeBuild both move folders this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from local.errors import HarnessError


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def upload_folder(s3: Any, folder: Path, uri: str) -> int:
    """Every file under ``folder`` to ``uri`` (a prefix), as ``aws s3 cp --recursive`` does; returns the count."""
    bucket, prefix = split_uri(uri)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)


def download_prefix(s3: Any, uri: str, dest: Path) -> int:
    """Every object under an S3Prefix into ``dest``, keeping the key's path below the prefix."""
    bucket, prefix = split_uri(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :].lstrip("/")
            if not relative or relative.endswith("/"):
                continue
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise HarnessError(f"S3 key {item['Key']!r} would land outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    if count == 0:
        raise HarnessError(f"no objects under {uri}")
    return count
