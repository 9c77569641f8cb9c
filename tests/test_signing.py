"""Release signatures: only the private key's holder can make a manifest readers accept."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tlpipe.signing import (
    KEY_ENV,
    TRUSTED_ENV,
    SignatureError,
    create_key,
    key_id,
    sign,
    signing_key,
    trusted_keys,
    verify,
)

MANIFEST = b'{"files": {"model.onnx": {"sha256": "ab"}}, "version": "1"}\n'


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    return tmp_path


def test_the_projects_key_is_made_once_private_and_trusted_by_the_project(project: Path) -> None:
    key = signing_key()
    path = project / ".tlpipe/keys/release.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (project / ".tlpipe/keys/release.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(signing_key().public_key()) == key_id(key.public_key())  # reused, not replaced
    assert list(trusted_keys()) == [key_id(key.public_key())]
    assert verify(MANIFEST, sign(MANIFEST, key), trusted_keys(), "s3://b/r") == key_id(key.public_key())


@pytest.mark.faults
def test_a_changed_manifest_or_a_stranger_key_is_refused(project: Path) -> None:
    key = signing_key()
    signature = sign(MANIFEST, key)
    trusted = trusted_keys()
    forged = MANIFEST.replace(b'"ab"', b'"cd"')
    with pytest.raises(SignatureError, match="does not match manifest.json"):
        verify(forged, signature, trusted, "s3://b/r")
    stranger = create_key(project / "stranger.key")
    with pytest.raises(
        SignatureError, match=f"signed by key {key_id(stranger.public_key())}, which is not trusted"
    ):
        verify(forged, sign(forged, stranger), trusted, "s3://b/r")
    # The record names a trusted key, but the signature is the stranger's.
    record = json.loads(sign(forged, stranger))
    record["key_id"] = key_id(key.public_key())
    with pytest.raises(SignatureError, match="does not match"):
        verify(forged, json.dumps(record).encode(), trusted, "s3://b/r")
    with pytest.raises(SignatureError, match="not a signature record"):
        verify(MANIFEST, b"{}", trusted, "s3://b/r")


def test_readers_trust_the_public_keys_they_are_given(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = create_key(project / "publisher.key")
    monkeypatch.setenv(TRUSTED_ENV, f"{project / 'publisher.pub'}:{project / 'other.pub'}")
    with pytest.raises(SignatureError, match="other.pub is not a readable PEM public key"):
        trusted_keys()
    monkeypatch.setenv(TRUSTED_ENV, str(project / "publisher.pub"))
    assert list(trusted_keys()) == [key_id(publisher.public_key())]
    assert not (project / ".tlpipe").exists()  # a reader makes no key of its own


def test_a_reader_with_no_key_is_told_what_to_set(project: Path) -> None:
    with pytest.raises(SignatureError, match=TRUSTED_ENV):
        trusted_keys()


def test_a_named_key_must_exist_and_be_private(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, str(project / "missing.key"))
    with pytest.raises(SignatureError, match="no such key file"):
        signing_key()
    create_key(project / "shared.key")
    os.chmod(project / "shared.key", 0o644)
    monkeypatch.setenv(KEY_ENV, str(project / "shared.key"))
    with pytest.raises(SignatureError, match="readable by other users"):
        signing_key()
