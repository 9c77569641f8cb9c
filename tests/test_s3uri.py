from __future__ import annotations

import pytest

from tlpipe.errors import StoreError
from tlpipe.s3uri import parse_s3_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.onnx", ("bucket", "a/b.onnx")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/releases/model/", ("bucket", "releases/model/")),
        ("s3://bucket/a?b#c", ("bucket", "a?b#c")),
        ("s3://my.bucket-2/data..v2/x.csv", ("my.bucket-2", "data..v2/x.csv")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.faults
@pytest.mark.parametrize(
    "uri",
    [
        "",
        "bucket/key",
        "s3:/bucket/key",
        "S3://bucket/key",
        "http://host/b/k",
        "s3://",
        "s3:///key",
        "s3://../x.csv",
        "s3://Bad_Bucket/x.csv",
        "s3://bucket/../../../../tmp/x.csv",
        "s3://bucket/a/./b.csv",
        "s3://bucket/a//b.csv",
        "s3://bucket//a.csv",
    ],
)
def test_parse_s3_uri_rejects(uri: str) -> None:
    """Among them keys that would leave their mirror under data/s3/ (read as a path there)."""
    with pytest.raises(ValueError, match=r"s3://|bucket|key") as info:
        parse_s3_uri(uri)
    assert isinstance(info.value, StoreError)
