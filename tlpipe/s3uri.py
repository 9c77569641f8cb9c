"""The s3:// URIs tlpipe reads and writes: a bucket's name and a key's parts, checked where
they are given (params at load, the command line) with nothing imported but the standard
library."""

from __future__ import annotations

import re

from tlpipe.errors import StoreError

# What S3 accepts as a bucket's name (dots and dashes inside, lower case).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def plain_path(key: str) -> bool:
    """Whether `key` is a relative path of plain parts (none empty, "." or "..", no NUL): one
    that stays below the folder it is written into."""
    return "\0" not in key and all(part not in ("", ".", "..") for part in key.split("/"))


class S3UriError(StoreError, ValueError):
    """A string that is not an s3://bucket[/key] URI."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "key") of "s3://bucket/key"; the key is "" for "s3://bucket" and keeps any
    trailing "/". Raises S3UriError (a StoreError and a ValueError) on anything else: a
    bucket that is no S3 bucket name, or a key with an empty, "." or ".." part (what is read
    under it is mirrored at the same path under data/s3/, which such a key would leave)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise S3UriError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not BUCKET_NAME.fullmatch(bucket):
        raise S3UriError(f"{uri!r} names no valid bucket (3-63 chars of a-z, 0-9, '.', '-')")
    if key and not plain_path(key.removesuffix("/")):
        raise S3UriError(f"{uri!r}: a key's parts between '/' may not be empty, '.' or '..'")
    return bucket, key
