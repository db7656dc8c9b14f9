"""The embedded demo data: deterministic, complete, boxes inside their images, classes not told by colour."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vgg_keras.data.demo import CENTRE_SPREAD, CLASSES, make_demo_data


def _digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.jpg")))).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    make_demo_data(tmp_path / "a", train_per_class=3, val_per_class=1, seed=7)
    make_demo_data(tmp_path / "b", train_per_class=3, val_per_class=1, seed=7)
    make_demo_data(tmp_path / "c", train_per_class=3, val_per_class=1, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_layout_counts_and_boxes(tmp_path):
    annotations = make_demo_data(tmp_path, train_per_class=4, val_per_class=2)
    assert len(CLASSES) >= 10 and annotations["classes"] == list(CLASSES)
    for split, count in (("train", 4), ("val", 2)):
        for label in CLASSES:
            assert len(list((tmp_path / split / label).glob("*.jpg"))) == count
    assert json.loads((tmp_path / "annotations.json").read_text()) == annotations
    sizes = set()
    for entry in annotations["images"]:
        with Image.open(tmp_path / entry["file"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (entry["width"], entry["height"])
            sizes.add(image.size)
        xmin, ymin, xmax, ymax = entry["box"]
        assert 0 <= xmin < xmax <= entry["width"] and 0 <= ymin < ymax <= entry["height"]
        # objects fill 50-90 % of the shorter side (some outlines are narrower than their radius)
        assert max(xmax - xmin, ymax - ymin) >= 0.25 * min(entry["width"], entry["height"])
        # near the centre, where the validation crop looks (a box's centre is off its shape's by < 0.3 its size)
        for low, high, side in ((xmin, xmax, entry["width"]), (ymin, ymax, entry["height"])):
            assert abs((low + high) / 2 - side / 2) <= CENTRE_SPREAD * side + 0.3 * (high - low) + 1
    assert len(sizes) > 0.8 * len(annotations["images"])  # varied image sizes and aspect ratios
    assert len({round(w / h, 1) for w, h in sizes}) > 5


def test_mean_colour_does_not_tell_the_class(tmp_path):
    annotations = make_demo_data(tmp_path, train_per_class=20, val_per_class=0)
    means = {label: [] for label in CLASSES}
    for entry in annotations["images"]:
        with Image.open(tmp_path / entry["file"]) as image:
            means[entry["label"]].append(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))
    class_means = np.array([np.mean(v, axis=0) for v in means.values()])
    within = np.mean([np.std(v, axis=0).mean() for v in means.values()])
    assert class_means.std(axis=0).mean() < 0.5 * within  # classes differ far less than images do


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_data(tmp_path)
    assert (tmp_path / "x.txt").read_text() == "keep me"


def test_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vgg_keras.cli", "make-demo-data", str(tmp_path / "demo"),
                             "--train-per-class", "2", "--val-per-class", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"30 images of 10 classes in {tmp_path / 'demo'}" in result.stdout


def test_object_range_and_centre_spread_reach_the_boxes(tmp_path):
    """Small, off-centre objects (for localisation experiments): sizes and centres spread as asked."""
    annotations = make_demo_data(tmp_path, train_per_class=30, val_per_class=0, object_range=(0.2, 0.4),
                                 centre_spread=0.35, classes=("circle",))
    sizes, offsets = [], []
    for entry in annotations["images"]:
        xmin, ymin, xmax, ymax = entry["box"]
        short = min(entry["width"], entry["height"])
        sizes.append((xmax - xmin) / short)  # circles: the box side is the object's size
        offsets.append(abs((xmin + xmax) / 2 - entry["width"] / 2) / entry["width"])
    assert 0.19 <= min(sizes) and max(sizes) <= 0.41
    assert max(offsets) > CENTRE_SPREAD + 0.05  # beyond the default's spread
    assert max(offsets) <= 0.35 + 0.01


@pytest.mark.parametrize("flags, message", [(["--object-range", "0.9:0.5"], "object range 0.9-0.5"),
                                            (["--object-range", "big"], "--object-range 'big'"),
                                            (["--centre-spread", "0.7"], "centre spread 0.7")])
def test_bad_spread_flags_are_named(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "vgg_keras.cli", "make-demo-data", str(tmp_path / "demo"),
                             "--train-per-class", "1", "--val-per-class", "1", *flags], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "demo").exists()
