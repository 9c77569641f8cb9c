"""Image inputs: the shapes users keep images in, read into rows of encoded bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlpipe.bundled import BUNDLED_IMAGES, materialize_images
from tlpipe.data import input_files, read_input
from tlpipe.errors import DataError
from tlpipe.images import decode, encode_png, facts, image_facts
from tlpipe.params import InputParams

COLUMNS = {"image": "image", "label": "label"}


def _digit(value: int, side: int = 8) -> np.ndarray:
    pixels = np.zeros((side, side), dtype=np.uint8)
    pixels[value % side, :] = 255
    return pixels


def _save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def test_a_folder_per_class_reads_its_labels_from_the_folder_names(tmp_path: Path) -> None:
    for label, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            _save(tmp_path / "pets" / label / f"{i}.png", _digit(i + len(label)))
    frame = read_input(InputParams(path="pets", columns=COLUMNS), "target", tmp_path)
    assert sorted(frame["label"]) == ["cat", "cat", "cat", "dog", "dog"]
    assert all(decode(b).shape == (8, 8, 1) for b in frame["image"])
    assert frame["_file"].str.endswith(".png").all()
    # Lineage hashes every image file of the folder.
    assert len(input_files("pets", "auto", tmp_path, "data.target.path")) == 5

    kept = read_input(
        InputParams(path="pets", columns=COLUMNS, select={"column": "label", "pattern": "^dog$"}),
        "target",
        tmp_path,
    )
    assert list(kept["label"]) == ["dog", "dog"]
    with pytest.raises(DataError, match="select can match its label alone"):
        read_input(
            InputParams(path="pets", columns=COLUMNS, select={"column": "file", "pattern": "x"}),
            "target",
            tmp_path,
        )


@pytest.mark.faults
def test_images_outside_a_class_folder_are_named(tmp_path: Path) -> None:
    _save(tmp_path / "pets" / "cat" / "a.png", _digit(1))
    _save(tmp_path / "pets" / "stray.png", _digit(2))
    with pytest.raises(DataError, match=r"1 image\(s\) sit outside a class folder \(e.g. stray.png\)"):
        read_input(InputParams(path="pets", columns=COLUMNS), "target", tmp_path)


def test_a_table_of_paths_reads_them_relative_to_the_table(tmp_path: Path) -> None:
    _save(tmp_path / "set" / "img" / "a.png", _digit(1))
    _save(tmp_path / "set" / "img" / "b.jpg", _digit(2), "JPEG")
    (tmp_path / "set" / "index.csv").write_text("file,kind\nimg/a.png,x\nimg/b.jpg,y\n")
    inp = InputParams(path="set/index.csv", columns={"image": "file", "label": "kind"})
    frame = read_input(inp, "target", tmp_path)
    assert list(frame["label"]) == ["x", "y"]
    assert frame["image"][0] == (tmp_path / "set/img/a.png").read_bytes()

    (tmp_path / "set" / "index.csv").write_text("file,kind\nimg/a.png,x\nimg/gone.png,y\n")
    with pytest.raises(DataError, match=r"image 'img/gone.png' not found \(read relative to"):
        read_input(inp, "target", tmp_path)


def test_a_parquet_of_bytes_keeps_them_and_a_null_stays_null(tmp_path: Path) -> None:
    table = pd.DataFrame({"png": [encode_png(_digit(1)), None, b"not an image"], "y": ["a", "b", "c"]})
    table.to_parquet(tmp_path / "t.parquet")
    frame = read_input(
        InputParams(path="t.parquet", columns={"image": "png", "label": "y"}), "target", tmp_path
    )
    assert frame["image"][1] is None
    found = image_facts(frame["image"])
    assert list(found["width"].astype(object).fillna(-1)) == [8, -1, -1]
    assert found["error"][0] is pd.NA
    assert "no image bytes" in found["error"][1] and "not a readable image" in found["error"][2]


def test_the_same_pixels_share_an_identity_whatever_the_file_format(tmp_path: Path) -> None:
    pixels = _digit(3)
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, format="BMP")
    png = facts(encode_png(pixels))
    assert png.pixels_sha256 == facts(bmp.getvalue()).pixels_sha256
    assert png.pixels_sha256 != facts(encode_png(_digit(4))).pixels_sha256
    assert (png.width, png.height, png.channels) == (8, 8, 1)


@pytest.mark.parametrize("path", list(BUNDLED_IMAGES))
def test_the_bundled_digit_sets_come_out_of_their_packages(tmp_path: Path, path: str) -> None:
    spec = BUNDLED_IMAGES[path]
    dest = materialize_images(tmp_path / path)
    table = pd.read_parquet(dest)
    assert len(table) == spec.rows
    assert sorted(table["label"].unique()) == [str(d) for d in range(10)]
    first = decode(table["image"][0])
    assert first.shape == (spec.side, spec.side, 1) and first.max() > 200
    assert materialize_images(dest) == dest  # already there: kept
    pd.DataFrame({"image": [b"x"], "label": ["1"]}).to_parquet(dest)
    with pytest.raises(DataError, match="is not the bundled"):
        materialize_images(dest)
