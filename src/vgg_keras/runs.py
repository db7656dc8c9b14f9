"""A run directory: what training leaves behind and what evaluation and export read.

    RUN/config.json        the fully resolved training configuration (see TrainConfig in train.py);
                           evaluation and export read "config", "scale" ([Smin, Smax]), "crop"
    RUN/class_names.json   list of class names, index = label
    RUN/stats.json         ColorStats used for mean subtraction and colour shift
    RUN/best.keras         the best model by validation top-1
    RUN/checkpoints/, state.json, log.csv, tensorboard/, history.png
                           training's own: the model and optimizer after the last completed epochs, and the
                           state and history that resuming reads (see train.py)
"""

import contextlib
import dataclasses
import json
import os

import keras

from .data.stats import IMAGENET_STATS, ColorStats
from .layers import LocalResponseNormalization  # noqa: F401  (registers the layer for load_model)


@dataclasses.dataclass
class Run:
    path: str
    model: keras.Model
    class_names: list
    stats: ColorStats
    scale: tuple | None  # training (Smin, Smax), None when unknown (a bare model file)
    crop: int
    config: dict


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` ('.tmp-' + its name, so the suffix Keras checks stays) to write to,
    renamed over `path` when the block succeeds: a kill mid-write never leaves a half-written `path`."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{name}")
    yield tmp
    os.replace(tmp, path)


def write_json_atomic(path, data):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


def load_run(path, which="best"):
    """Load a run directory (its `<which>.keras`: `best.keras`, the only model file training writes) or a bare
    `.keras` model file."""
    if os.path.isdir(path):
        model_path = os.path.join(path, f"{which}.keras")
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"{path} is not a finished run: {model_path} does not exist")
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "class_names.json")) as f:
            class_names = json.load(f)
        stats_path = os.path.join(path, "stats.json")
        stats = ColorStats.from_json(stats_path) if os.path.exists(stats_path) else IMAGENET_STATS
        scale = tuple(config["scale"])
        crop = int(config.get("crop", 224))
    elif os.path.isfile(path) and path.endswith(".keras"):
        model_path, config, scale, stats = path, {}, None, IMAGENET_STATS
        class_names, crop = None, None
    else:
        raise FileNotFoundError(f"{path}: neither a run directory nor a .keras model file")
    model = keras.saving.load_model(model_path, compile=False)
    if class_names is None:
        class_names = [str(i) for i in range(model.output_shape[-1])]
    if crop is None:
        crop = model.input_shape[1]
    return Run(path=path, model=model, class_names=class_names, stats=stats, scale=scale, crop=crop, config=config)
