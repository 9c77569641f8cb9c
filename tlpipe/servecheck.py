"""The serving check's own process: `python -m tlpipe.servecheck URI RECORDED FOLDER`.

It downloads the release URI names (a model and an alias) into FOLDER, which starts empty,
verifies it against its signed manifest, loads it with onnxruntime, asks it for the inputs
in RECORDED (export's serving.json) and prints, as JSON on stdout: the version it resolved,
how many rows it asked, the indices of those whose prediction differs from the recorded
one, and whether torch was imported at any point (it must not be: a serving host has none).
The store is the one TLPIPE_S3_ENDPOINT names, with the credentials in the environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tlpipe.gates import same_prediction
from tlpipe.release import fetch_release
from tlpipe.s3uri import parse_s3_uri
from tlpipe.serve import from_wire, load_bundle
from tlpipe.store import open_store


def main(uri: str, recorded_path: Path, folder: Path) -> dict:
    recorded = json.loads(recorded_path.read_text())
    bucket, _ = parse_s3_uri(uri)
    with open_store(bucket) as store:
        bundle_dir = fetch_release(store, uri, folder / "releases")
    version = json.loads((bundle_dir / "manifest.json").read_text())["version"]
    inputs = [from_wire(x) for x in recorded["inputs"]]
    served = load_bundle(bundle_dir).predict(inputs)
    differ = [
        i for i, (got, want) in enumerate(zip(served, recorded["predictions"], strict=True))
        if not same_prediction(got, want)
    ]  # fmt: skip
    return {
        "version": version,
        "rows": len(inputs),
        "differ": differ,
        "torch_loaded": "torch" in sys.modules,
    }


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m tlpipe.servecheck URI RECORDED FOLDER")
    try:
        print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
    except Exception as err:  # the parent reports the last line of stderr
        sys.exit(f"{type(err).__name__}: {err}")
