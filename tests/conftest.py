"""Shared fixtures: tiny models and run directories (every test builds its own images)."""

import json
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import vgg_keras  # noqa: E402,F401  (before any test module imports TensorFlow: it chooses oneDNN)


def make_run_dir(path, config="A", num_classes=3, crop=32, scale=(40, 48), seed=0):
    """A run directory as training leaves it (see vgg_keras.runs), with a randomly initialised model."""
    from vgg_keras.data.stats import IMAGENET_STATS

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = vgg_keras.build_vgg(config, num_classes=num_classes, input_shape=(crop, crop, 3),
                                init="glorot", seed=seed)
    model.save(path / "best.keras")
    (path / "config.json").write_text(json.dumps({"config": config, "num_classes": num_classes,
                                                  "crop": crop, "scale": list(scale)}))
    (path / "class_names.json").write_text(json.dumps([f"class_{i}" for i in range(num_classes)]))
    IMAGENET_STATS.to_json(path / "stats.json")
    return path


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory of config A with 3 classes, trained at crop 32 with S in [40, 48]."""
    return make_run_dir(tmp_path / "run")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(items):
    """The `slow` tests (20 s to 3 min each) first: `make test` hands tests one by one to two workers (pytest-xdist,
    --maxschedchunk 1), and a long test started last would leave one core idle while it finishes."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise in file order
