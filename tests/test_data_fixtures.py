"""Helpers of the data tests (imported by tests/test_data_*.py): small images in any format, class folders, and an
in-memory source for drawing many augmentations of one image."""

import io
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vgg_keras.data import SKIPPED


def encode(pixels, fmt="JPEG", mode=None, **options):
    """Bytes of an image (uint8 array [h, w, 3] or [h, w]) in `fmt`, converted to PIL `mode` first if given."""
    image = Image.fromarray(np.asarray(pixels, np.uint8))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def ramp(height, width, step=2):
    """Grey horizontal ramp: pixel value step * x, so a crop's slope tells the scale it was rescaled by."""
    row = np.arange(width, dtype=np.float64) * step
    return np.repeat(np.repeat(row[None, :, None], height, 0), 3, 2).clip(0, 255).astype(np.uint8)


def write_files(root, files):
    """Write {relative path: bytes} under root; returns root as a Path."""
    root = pathlib.Path(root)
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def good_images(classes=("a", "b"), per_class=3, size=(40, 48), prefix=""):
    """{prefix<class>/img<i>.jpg: JPEG bytes} of small noise images."""
    return {f"{prefix}{name}/img{i}.jpg": encode(noise(*size, seed=10 * label + i))
            for label, name in enumerate(classes) for i in range(per_class)}


class BytesSource:
    """A source (the interface of vgg_keras.data.sources) over in-memory files: [(bytes, label, id)] for both splits."""

    def __init__(self, items, class_names=("a", "b")):
        self.items, self.class_names, self.spec = list(items), list(class_names), "memory"

    def num_examples(self, split):
        return len(self.items)

    def records(self, split, shuffle=False, seed=None):
        data, labels, ids = zip(*self.items)
        records = tf.data.Dataset.from_tensor_slices(
            {"image": list(data), "label": np.array(labels, np.int64), "id": list(ids)})
        return records.shuffle(len(self.items), seed=seed) if shuffle else records


def repeated(data, times, label=0):
    """A BytesSource of the same file `times` times (ids differ)."""
    return BytesSource([(data, label, f"copy{i}") for i in range(times)])


def batches(dataset):
    """All (images, labels) of a dataset as two numpy arrays."""
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(autouse=True)
def fresh_skipped():
    """Each test starts with an empty record of skipped files (it is process-wide); import it to use it."""
    SKIPPED.clear()
    yield
    SKIPPED.clear()
