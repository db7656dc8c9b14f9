"""Files that are not what they claim: every decodable image is used (as 3-channel RGB), every undecodable file is
skipped, counted and reported once, and the pipeline never stops on a file. One test per case, through the training
pipeline over a class folder; `check-data` names what it skips."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from test_data_fixtures import batches, encode, fresh_skipped, good_images, noise, write_files  # noqa: F401

from vgg_keras import cli
from vgg_keras.data import SKIPPED, check_data, decode_record, decode_records, load_source, train_dataset
from vgg_keras.data.stats import ColorStats

GOOD = good_images(per_class=2)  # 4 good JPEGs in classes a and b
ZERO_MEAN = ColorStats(mean_rgb=(0.0, 0.0, 0.0), eigenvalues=(0.2, 0.02, 0.005),
                       eigenvectors=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def one_epoch(root, **options):
    """(images, labels) of one epoch of the training pipeline over the class folder `root`."""
    src = load_source(root, val_fraction=0.0)
    return batches(train_dataset(src, 4, scale=(32, 48), crop=32, stats=ZERO_MEAN, seed=0, **options))


def assert_skipped(tmp_path, name, data, reason):
    """With `name` holding `data` beside the good images: only the good images are used, `name` is reported."""
    images, _ = one_epoch(write_files(tmp_path, GOOD | {name: data}))
    assert len(images) == len(GOOD)
    skipped = SKIPPED.reasons()
    assert list(skipped) == [str(tmp_path / name)] and reason in skipped[str(tmp_path / name)]


def only_image(tmp_path, name, data):
    """The crops (mean zero, no flip, no colour shift) of a folder holding just `name`."""
    images, labels = one_epoch(write_files(tmp_path, {name: data}), flip=False, color_shift=False)
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [0] and not SKIPPED.reasons()
    return images[0]


# Undecodable: skipped, reported ---------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    assert_skipped(tmp_path, "a/empty.JPEG", b"", "empty")


def test_corrupt_file_of_random_bytes(tmp_path):
    assert_skipped(tmp_path, "a/random.JPEG", np.random.default_rng(0).bytes(3000), "not a JPEG, PNG, GIF")


def test_truncated_jpeg(tmp_path):
    """TensorFlow refuses it (decode_jpeg raises), though a window near its top would decode: always skipped."""
    data = encode(noise(64, 64))
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(data[:len(data) // 2])
    assert_skipped(tmp_path, "b/truncated.JPEG", data[:len(data) // 2], "truncated JPEG")


def test_truncated_png(tmp_path):
    data = encode(noise(64, 64), "PNG")
    assert_skipped(tmp_path, "b/truncated.png", data[:-100], "truncated PNG")


def test_unsupported_format_named_jpeg(tmp_path):
    assert_skipped(tmp_path, "a/tiff.JPEG", encode(noise(20, 20), "TIFF"), "not a JPEG, PNG, GIF")


def test_corrupt_jpeg_header_is_dropped_in_training_and_named_by_check_data(tmp_path):
    """Its markers look right, so only decoding finds out: training drops it (ignore_errors), check-data names it."""
    good = encode(noise(40, 48))
    corrupt = good[:3] + b"\0" * 300 + good[303:]
    root = write_files(tmp_path, GOOD | {"a/corrupt.jpg": corrupt})
    images, _ = one_epoch(root)
    assert len(images) == len(GOOD)
    report = check_data(load_source(root, val_fraction=0.0), scale=(32, 48), crop=32)
    assert report.used == len(GOOD)
    assert "TensorFlow could not decode it" in report.splits[0].skipped[str(root / "a/corrupt.jpg")]


def test_broken_link(tmp_path):
    root = write_files(tmp_path, GOOD)
    os.symlink(tmp_path / "nowhere.jpg", root / "a/link.jpg")
    images, _ = one_epoch(root)
    assert len(images) == len(GOOD) and "unreadable" in SKIPPED.reasons()[str(root / "a/link.jpg")]


def test_file_that_vanishes_after_listing(tmp_path):
    root = write_files(tmp_path, GOOD)
    src = load_source(root, val_fraction=0.0)
    os.remove(root / "a/img0.jpg")
    images, _ = batches(train_dataset(src, 4, scale=(32, 48), crop=32, seed=0))
    assert len(images) == len(GOOD) - 1


def test_bad_file_is_reported_once_per_run(tmp_path, caplog):
    root = write_files(tmp_path, GOOD | {"a/empty.jpg": b""})
    dataset = train_dataset(load_source(root, val_fraction=0.0), 2, scale=(32, 48), crop=32, seed=0)
    with caplog.at_level(logging.WARNING, logger="vgg_keras.data"):
        counts = [len(batches(dataset)[0]) for _ in range(3)]  # three epochs
    assert counts == [len(GOOD)] * 3
    assert [r.getMessage() for r in caplog.records if "empty.jpg" in r.getMessage()] == [
        f"skipping {root / 'a/empty.jpg'}: empty or unreadable file"]


# Decodable: used, as RGB ----------------------------------------------------------------------------------------------

def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path):
    crop = only_image(tmp_path, "a/grey.JPEG", encode(noise(40, 40), mode="L"))
    np.testing.assert_allclose(crop[..., 0], crop[..., 1])
    np.testing.assert_allclose(crop[..., 0], crop[..., 2])
    assert crop.std() > 10  # the picture, not a blank


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    colour = (200, 60, 30)
    data = encode(np.full((40, 40, 3), colour), mode="CMYK")
    assert data[:4] == b"\xff\xd8\xff\xee"  # Adobe marker: a real CMYK JPEG
    np.testing.assert_allclose(only_image(tmp_path, "a/cmyk.JPEG", data).mean((0, 1)), colour, atol=12)


def test_png_named_jpeg(tmp_path):
    colour = (10, 120, 250)
    crop = only_image(tmp_path, "a/really_a_png.JPEG", encode(np.full((40, 40, 3), colour), "PNG"))
    np.testing.assert_allclose(crop.reshape(-1, 3), np.tile(colour, (32 * 32, 1)), atol=1e-3)


@pytest.mark.parametrize("fmt, mode", [("GIF", "P"), ("BMP", None), ("WEBP", None), ("PNG", "RGBA"),
                                       ("PNG", "LA"), ("PNG", "P")])
def test_other_formats_and_modes(tmp_path, fmt, mode):
    colour = (40, 160, 220)
    crop = only_image(tmp_path, f"b/image.{fmt.lower()}", encode(np.full((40, 40, 3), colour), fmt, mode=mode,
                                                                 **({"lossless": True} if fmt == "WEBP" else {})))
    expected = np.full(3, 0.299 * 40 + 0.587 * 160 + 0.114 * 220 if mode == "LA" else colour)  # LA: PIL's luma
    np.testing.assert_allclose(crop.mean((0, 1)), expected, atol=2)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 5)])
def test_tiny_images(tmp_path, size):
    crop = only_image(tmp_path, "a/tiny.jpg", encode(np.full((*size, 3), 128), quality=100))
    np.testing.assert_allclose(crop, 128, atol=3)  # upscaled, not padded


@pytest.mark.parametrize("size", [(4, 600), (600, 4), (20, 1000)])
def test_extreme_aspect_ratios(tmp_path, size):
    crop = only_image(tmp_path, "a/strip.jpg", encode(noise(*size)))
    assert crop.std() > 10


# Reports --------------------------------------------------------------------------------------------------------------

def test_check_data_counts_used_skipped_and_classes(tmp_path):
    bad = {"a/empty.jpg": b"", "b/random.jpg": b"not an image at all", "b/cut.jpg": encode(noise(40, 40))[:300]}
    root = write_files(tmp_path, good_images(per_class=3) | bad)
    report = check_data(load_source(root, val_fraction=0.0), scale=(32, 48), crop=32)
    train, val = report.splits
    assert (train.used, val.used, train.class_counts) == (6, 0, [3, 3])
    assert set(train.skipped) == {str(root / name) for name in bad}
    text = report.format()
    assert f"skipped {root / 'a/empty.jpg'}: empty or unreadable file" in text
    assert "train: 6 images used, 3 files skipped" in text


def test_check_data_command_exit_codes(tmp_path, capsys):
    good = write_files(tmp_path / "good", GOOD)
    only_bad = write_files(tmp_path / "bad", {"a/empty.jpg": b"", "b/text.jpg": b"hello"})
    flags = ["--scale", "32:48", "--crop", "32", "--val-fraction", "0"]
    assert cli.main(["check-data", "--data", str(good)] + flags) == 0
    assert cli.main(["check-data", "--data", str(only_bad)] + flags) == 1
    assert "train: 0 images used, 2 files skipped" in capsys.readouterr().out
    assert cli.main(["check-data", "--data", str(good), "--scale", "48:32"]) == 2
    assert "Smin (48) is larger than Smax (32)" in capsys.readouterr().err


def test_decode_record_for_evaluation(tmp_path):
    root = write_files(tmp_path, {"a/good.png": encode(noise(30, 20), "PNG"), "a/bad.jpg": b"x"})
    records = list(load_source(root, val_fraction=0.0).records("train"))
    images = {r["id"].numpy().decode(): decode_record(r) for r in records}
    assert images[str(root / "a/bad.jpg")].shape == (0, 0, 3)
    np.testing.assert_array_equal(images[str(root / "a/good.png")].numpy(), noise(30, 20))
    decoded = list(decode_records(load_source(root, val_fraction=0.0).records("train")))
    assert [d["id"].numpy().decode() for d in decoded] == [str(root / "a/good.png")]
    assert decoded[0]["image"].dtype == tf.float32 and decoded[0]["label"].numpy() == 0
