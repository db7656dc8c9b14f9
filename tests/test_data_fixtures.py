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


# Real-world files, built byte by byte ---------------------------------------------------------------------------------

def bmp(indices, palette=None, bpp=8, compression=0, pixels=None):
    """Bytes of a bottom-up BMP (BITMAPINFOHEADER): `indices` [h, w] into `palette` [n, 3] RGB at 1/4/8 bits per
    pixel, uncompressed or RLE (compression 1: RLE8, 2: RLE4); or, with bpp=16 and `pixels` [h, w] of 565 values,
    BI_BITFIELDS (compression 3)."""
    rows = []
    height, width = (np.shape(indices) if pixels is None else np.shape(pixels))
    for row in (np.asarray(indices if pixels is None else pixels)[::-1]):
        if compression in (1, 2):  # runs of one pixel each (count, value), end of line
            if compression == 1:
                data = b"".join(bytes([1, int(v)]) for v in row)
            else:  # RLE4: a run of 2 alternating nibbles
                data = b"".join(bytes([min(2, len(row) - i), (int(row[i]) << 4) | int(row[min(i + 1, len(row) - 1)])])
                                for i in range(0, len(row), 2))
            rows.append(data + b"\0\0")
            continue
        if bpp == 16:
            data = b"".join(int(v).to_bytes(2, "little") for v in row)
        else:
            per_byte = 8 // bpp
            packed = []
            for start in range(0, len(row), per_byte):
                byte = 0
                for k, v in enumerate(row[start:start + per_byte]):
                    byte |= int(v) << (8 - bpp * (k + 1))
                packed.append(byte)
            data = bytes(packed)
        rows.append(data + b"\0" * (-len(data) % 4))
    if compression in (1, 2):
        rows.append(b"\0\1")
    image = b"".join(rows)
    palette_bytes = b"".join(bytes([b, g, r, 0]) for r, g, b in (palette if palette is not None else []))
    masks = b"".join(m.to_bytes(4, "little") for m in (0xF800, 0x07E0, 0x001F)) if compression == 3 else b""
    offset = 14 + 40 + len(masks) + len(palette_bytes)
    info = b"".join([(40).to_bytes(4, "little"), int(width).to_bytes(4, "little", signed=True),
                     int(height).to_bytes(4, "little", signed=True), (1).to_bytes(2, "little"),
                     bpp.to_bytes(2, "little"), compression.to_bytes(4, "little"), len(image).to_bytes(4, "little"),
                     (2835).to_bytes(4, "little") * 2, (len(palette_bytes) // 4).to_bytes(4, "little"),
                     (0).to_bytes(4, "little")])
    header = b"BM" + (offset + len(image)).to_bytes(4, "little") + b"\0\0\0\0" + offset.to_bytes(4, "little")
    return header + info + masks + palette_bytes + image


def exif_app1(orientation, big_endian=False, thumbnail=b""):
    """An APP1 Exif segment holding IFD0 with Orientation (and other tags around it), in either byte order; any
    `thumbnail` bytes are appended inside the segment (as a camera's JPEG thumbnail)."""
    order = "big" if big_endian else "little"

    def entry(tag, kind, value):  # value in the 4-byte field (a SHORT left-justified)
        field = value.to_bytes(2, order) + b"\0\0" if kind == 3 else value.to_bytes(4, order)
        return tag.to_bytes(2, order) + kind.to_bytes(2, order) + (1).to_bytes(4, order) + field

    entries = [entry(0x0100, 4, 64), entry(0x0101, 4, 48), entry(0x0112, 3, orientation), entry(0x011A, 4, 72)]
    tiff = (b"MM\0*" if big_endian else b"II*\0") + (8).to_bytes(4, order) + len(entries).to_bytes(2, order)
    tiff += b"".join(entries) + (0).to_bytes(4, order) + thumbnail
    body = b"Exif\0\0" + tiff
    return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body


def with_segment(jpeg, segment, after_app0=True):
    """A JPEG with `segment` inserted after SOI, or after the JFIF APP0 segment that Pillow writes first."""
    position = 2
    if after_app0 and jpeg[2:4] == b"\xff\xe0":
        position = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:position] + segment + jpeg[position:]
