"""Real-world folders and files (issue 11), each input built here from bytes: what operating systems, zip tools and
NAS boxes leave in folders; ImageNet's flat validation folder; images as a viewer shows them (EXIF orientation,
palette and compressed BMPs, motion photos); nothing lost without a name (dropped files, damaged shards); the JSON
report of check-data."""

import io
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_data_fixtures import (batches, bmp, encode, exif_app1, fresh_skipped, good_images, noise,  # noqa: F401
                                with_segment, write_files)

from vgg_keras import cli
from vgg_keras.data import SKIPPED, check_data, decode_record, load_source, prepare, train_dataset, val_dataset
from vgg_keras.data.decode import PILLOW_ONLY, OK, TRUNCATED_JPEG, bad_file_reason, decode_window
from vgg_keras.data.images import decode_rgb
from vgg_keras.data.stats import ColorStats
from vgg_keras.data.tfrecords import METADATA
from vgg_keras.export import checked_decode

ZERO_MEAN = ColorStats(mean_rgb=(0.0, 0.0, 0.0), eigenvalues=(0.2, 0.02, 0.005),
                       eigenvectors=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
PLAIN = dict(flip=False, color_shift=False, stats=ZERO_MEAN)
CHECK = dict(scale=(32, 48), crop=32)


def ids(src, split):
    return sorted(os.fsdecode(r["id"]) for r in src.records(split).as_numpy_iterator())


def one_epoch(root, **options):
    src = load_source(root, val_fraction=0.0)
    return batches(train_dataset(src, 4, scale=(32, 48), crop=32, seed=0, **{**PLAIN, **options}))


# A. Which files and classes a folder holds ----------------------------------------------------------------------------

def test_tool_made_folders_and_empty_classes_get_no_label(tmp_path, caplog):
    """macOS zips (__MACOSX with ._ files), Synology (@eaDir), Windows ($RECYCLE.BIN, Thumbs.db), hidden folders, at
    every depth; a class folder with no image is left out with a warning and does not shift the labels."""
    junk = {"__MACOSX/cat/._a0.jpg": b"\0\5\x16\7", "cat/@eaDir/a0.jpg/SYNOPHOTO_THUMB_M.jpg": encode(noise(8, 8)),
            "dog/.thumbnails/x.jpg": encode(noise(8, 8)), "$RECYCLE.BIN/cat/old.jpg": encode(noise(8, 8)),
            "cat/._a1.jpg": b"\0\5\x16\7", "dog/Thumbs.db": b"x", "empty/notes.txt": b"x", ".git/x.jpg": b"x"}
    root = write_files(tmp_path, good_images(("cat", "dog"), 2) | junk)
    (root / "nothing").mkdir()
    with caplog.at_level(logging.WARNING, logger="vgg_keras.data"):
        src = load_source(root, val_fraction=0.0)
    assert src.class_names == ["cat", "dog"]
    assert ids(src, "train") == [str(root / f"{c}/img{i}.jpg") for c in ("cat", "dog") for i in range(2)]
    assert set(src.left_out) == {str(root / "empty"), str(root / "nothing")}
    assert any("class folder" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)
    report = check_data(src, **CHECK)
    assert report.splits[0].class_counts == [2, 2] and not report.splits[0].skipped
    assert f"class folder left out: {root / 'empty'}: no image file in it" in report.format()


def test_non_utf8_file_names_are_read_and_escaped(tmp_path, capsys):
    root = write_files(tmp_path, good_images(("a", "b"), 2))
    name = os.path.join(os.fsencode(root), b"a", b"caf\xe9.jpg")
    with open(name, "wb") as f:
        f.write(encode(noise(40, 48)))
    with open(os.path.join(os.fsencode(root), b"b", b"bad\xff.jpg"), "wb") as f:
        f.write(b"not an image")
    src = load_source(root, val_fraction=0.0)
    assert src.num_examples("train") == 6
    images, labels = one_epoch(root)
    assert len(images) == 5 and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert list(SKIPPED.reasons()) == [f"{root}/b/bad\\xff.jpg"]  # escaped, printable
    assert cli.main(["check-data", "--data", str(root), "--val-fraction", "0", "--scale", "32:48", "--crop", "32",
                     "--json", str(tmp_path / "report.json")]) == 0
    assert "train: 5 images used, 1 files skipped" in capsys.readouterr().out
    prepare(src, tmp_path / "records")  # prepare and stats read them too
    assert load_source(tmp_path / "records").num_examples("train") == 5


def test_a_class_named_train(tmp_path):
    """VOC/CIFAR-100 have a class "train": with images directly in it, ROOT is class folders."""
    root = write_files(tmp_path / "flat", good_images(("bus", "car", "train"), 2))
    src = load_source(root, val_fraction=0.0)
    assert src.layout == "classes" and src.class_names == ["bus", "car", "train"]
    nested = write_files(tmp_path / "nested", good_images(("bus", "car"), 2)
                         | good_images(("electric", "steam"), 1, prefix="train/"))
    with pytest.raises(ValueError, match="ambiguous layout.*bus, car.*--layout splits.*--layout classes"):
        load_source(nested)
    as_classes = load_source(nested, layout="classes", val_fraction=0.0)
    assert as_classes.class_names == ["bus", "car", "train"] and as_classes.num_examples("train") == 6
    as_splits = load_source(nested, layout="splits", val_fraction=0.0)
    assert as_splits.class_names == ["electric", "steam"]
    split_layout = write_files(tmp_path / "splits", good_images(("a", "b"), 2, prefix="train/")
                               | good_images(("a", "b"), 1, prefix="val/") | {"__MACOSX/x": b"", "README.txt": b""})
    assert load_source(split_layout).layout == "splits"


def test_links_and_nested_folders_use_each_image_once(tmp_path):
    root = write_files(tmp_path / "data", good_images(("a", "b"), 2) | {"a/deeper/more.jpg": encode(noise(40, 40))})
    elsewhere = write_files(tmp_path / "elsewhere", {"c1.jpg": encode(noise(30, 30, seed=5))})
    os.symlink(elsewhere, root / "b" / "linked")  # a folder linked into a class: followed
    os.symlink(root / "a", root / "a" / "deeper" / "loop")  # a cycle: never entered twice
    os.symlink(root / "a" / "img0.jpg", root / "a" / "again.jpg")  # a second name of one image
    os.symlink(root / "a" / "img1.jpg", root / "b" / "stolen.jpg")  # the same image in another class
    src = load_source(root, val_fraction=0.0)
    # The first name in sorted order is kept: a/again.jpg (a link) before a/img0.jpg (the file it names).
    assert ids(src, "train") == sorted(str(root / p) for p in (
        "a/again.jpg", "a/deeper/more.jpg", "a/img1.jpg", "b/img0.jpg", "b/img1.jpg", "b/linked/c1.jpg"))
    assert src.notes == {str(root / "a/img0.jpg"): f"the same file as {root / 'a/again.jpg'}",
                         str(root / "b/stolen.jpg"): f"the same file as {root / 'a/img1.jpg'}"}
    # No leakage: an image of train/ linked into val/ is not validated on.
    splits = write_files(tmp_path / "splits", good_images(("a", "b"), 2, prefix="train/")
                         | good_images(("a", "b"), 1, size=(30, 30), prefix="val/"))
    os.symlink(splits / "train/a/img0.jpg", splits / "val/a/leak.jpg")
    src = load_source(splits)
    assert ids(src, "val") == [str(splits / "val/a/img0.jpg"), str(splits / "val/b/img0.jpg")]
    assert str(splits / "val/a/leak.jpg") in src.notes


# B. ImageNet's own layouts -------------------------------------------------------------------------------------------

def imagenet_like(tmp_path, labels_name, rows, header=None):
    """Kaggle's layout: ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/<flat>} and the label CSV three folders up."""
    wnids = ("n01440764", "n01443537")
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    write_files(root, good_images(wnids, 2, prefix="train/"))
    write_files(root / "val", {f"ILSVRC2012_val_{i:08d}.JPEG": encode(noise(30, 30, seed=i)) for i in (1, 2, 3)})
    lines = ([header] if header else []) + rows
    (tmp_path / labels_name).write_text("\n".join(lines) + "\n")
    return root


def test_flat_imagenet_validation_with_kaggle_labels(tmp_path):
    root = imagenet_like(tmp_path, "LOC_val_solution.csv", [
        "ILSVRC2012_val_00000001,n01443537 10 20 30 40 n01443537 1 2 3 4", "ILSVRC2012_val_00000002,n01440764 1 2 3 4",
        "ILSVRC2012_val_00000009,n01440764 1 2 3 4"], header="ImageId,PredictionString")
    src = load_source(root)
    assert src.layout == "splits" and src.class_names == ["n01440764", "n01443537"]
    val = {os.path.basename(os.fsdecode(r["id"])): int(r["label"]) for r in src.records("val").as_numpy_iterator()}
    assert val == {"ILSVRC2012_val_00000001.JPEG": 1, "ILSVRC2012_val_00000002.JPEG": 0}
    assert src.notes == {str(root / "val/ILSVRC2012_val_00000003.JPEG"): "no label for it in the label file"}


def test_flat_validation_with_a_plain_csv_and_its_errors(tmp_path):
    root = imagenet_like(tmp_path, "labels.csv", [f"ILSVRC2012_val_{i:08d}.JPEG,n01440764" for i in (1, 2, 3)],
                         header="file,label")
    with pytest.raises(ValueError, match=r"val holds 3 images directly and no label file.*--val-labels FILE"):
        load_source(root)
    assert load_source(root, val_labels=tmp_path / "labels.csv").num_examples("val") == 3
    (tmp_path / "bad.csv").write_text("ILSVRC2012_val_00000001.JPEG,n99999999\n")
    with pytest.raises(ValueError, match="1 labels are not training class folders .*n99999999"):
        load_source(root, val_labels=tmp_path / "bad.csv")


def test_an_empty_validation_split_is_an_error_before_training(tmp_path):
    root = write_files(tmp_path, good_images(("a", "b"), 2, prefix="train/"))
    (root / "val" / "a").mkdir(parents=True)
    src = load_source(root)
    with pytest.raises(ValueError, match=r"the val split holds no image \(.*/val\)\. Give it some"):
        val_dataset(src, 2, crop=32, q=32)
    with pytest.raises(ValueError, match="--val-fraction > 0"):
        val_dataset(load_source(write_files(tmp_path / "c", good_images()), val_fraction=0.0), 2, crop=32, q=32)


# C. Images as a viewer shows them ------------------------------------------------------------------------------------

TRANSPOSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
             6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}  # Pillow's ImageOps.exif_transpose


def oriented_jpeg(orientation, big_endian=False, after_app0=True):
    """(bytes, displayed pixels): a 64 wide x 48 high phone JPEG with EXIF `orientation`, and what a viewer shows."""
    plain = encode(noise(48, 64), quality=95, subsampling=0)
    stored = tf.io.decode_jpeg(plain).numpy()
    shown = np.asarray(Image.fromarray(stored).transpose(TRANSPOSE[orientation])) if orientation > 1 else stored
    return with_segment(plain, exif_app1(orientation, big_endian), after_app0), shown


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("big_endian, after_app0", [(False, True), (True, False)])
def test_exif_orientation_in_every_decode(orientation, big_endian, after_app0):
    data, shown = oriented_jpeg(orientation, big_endian, after_app0)
    np.testing.assert_array_equal(decode_rgb(data).numpy(), shown)  # evaluation, stats, prepare
    np.testing.assert_array_equal(checked_decode(tf.constant(data), 0).numpy(), shown)  # the serving graph
    window = decode_window(tf.constant(data), lambda shape: tf.constant([3, 5, 20, 10]), 10).numpy()
    np.testing.assert_array_equal(window, shown[3:23, 5:15])  # training: window mapped, decoded, rotated


def test_training_crops_come_from_the_displayed_image(tmp_path):
    """Stored 64x48 with Orientation 6: a 48-pixel crop at S=48 is a window of the 48-wide, 64-high image."""
    data, shown = oriented_jpeg(6)
    src = load_source(write_files(tmp_path, {"a/phone.jpg": data}), val_fraction=0.0)
    images, _ = batches(train_dataset(src, 1, scale=(48, 48), crop=48, seed=0, **PLAIN).repeat(3))
    for crop in images:
        errors = [np.abs(crop - shown[top:top + 48]).mean() for top in range(shown.shape[0] - 47)]
        assert shown.shape[:2] == (64, 48) and min(errors) < 1.0


def test_motion_photo_jpeg_followed_by_a_video(tmp_path):
    jpeg = encode(noise(40, 48))
    motion = jpeg + b"\0\0\0\x18ftypmp42" + bytes(range(250)) * 40  # 10 KiB of "MP4" after the end marker
    assert int(bad_file_reason(motion)) == OK
    np.testing.assert_array_equal(checked_decode(tf.constant(motion), 0).numpy(), decode_rgb(jpeg).numpy())
    images, _ = one_epoch(write_files(tmp_path, {"a/MVIMG_0001.jpg": motion}))
    assert len(images) == 1 and not SKIPPED.reasons()
    # Still caught: a truncated JPEG whose Exif thumbnail has an end marker of its own.
    thumbnail = encode(noise(8, 8))
    big = with_segment(encode(noise(200, 200)), exif_app1(1, thumbnail=thumbnail))
    assert int(bad_file_reason(big[:len(big) // 2])) == TRUNCATED_JPEG


PALETTE = np.random.default_rng(1).integers(0, 256, (16, 3))
INDICES = np.random.default_rng(2).integers(0, 16, (40, 44))
BMPS = {  # name: (bytes, the colours a viewer shows)
    "8-bit, 16 colours": (bmp(INDICES, PALETTE, 8), PALETTE[INDICES]),
    "4-bit": (bmp(INDICES, PALETTE, 4), PALETTE[INDICES]),
    "1-bit": (bmp(INDICES % 2, PALETTE[:2], 1), PALETTE[INDICES % 2]),
    "RLE8": (bmp(INDICES, PALETTE, 8, compression=1), PALETTE[INDICES]),
    "RLE4": (bmp(INDICES, PALETTE, 4, compression=2), PALETTE[INDICES]),
    "16-bit BI_BITFIELDS": (bmp(None, bpp=16, compression=3, pixels=INDICES * 4000),
                            np.asarray(Image.open(io.BytesIO(bmp(None, bpp=16, compression=3, pixels=INDICES * 4000)))
                                       .convert("RGB"))),
}


@pytest.mark.parametrize("name", BMPS)
def test_bmp_variants_give_their_colours(name):
    data, colours = BMPS[name]
    image = decode_record({"image": tf.constant(data), "id": tf.constant(name)}).numpy()  # evaluation's decode
    np.testing.assert_array_equal(image, colours)
    if name == "8-bit, 16 colours":  # decoded in the graph: the serving graph shows the colours too
        np.testing.assert_array_equal(checked_decode(tf.constant(data), 0).numpy(), colours)
    else:  # a py_function cannot be served: refused with a message that says what to do
        assert int(bad_file_reason(data)) == PILLOW_ONLY
        with pytest.raises(tf.errors.InvalidArgumentError, match="BMP variant .* TensorFlow cannot decode.*PNG"):
            checked_decode(tf.constant(data), 0)


def test_bmp_variants_in_training_and_check_data(tmp_path):
    """One class per variant, so that each crop's label says which file it came from."""
    names = sorted(BMPS)
    root = write_files(tmp_path, {f"{i}/image.bmp": BMPS[name][0] for i, name in enumerate(names)})
    crops, labels = one_epoch(root)
    assert sorted(labels.tolist()) == list(range(len(names))) and not SKIPPED.reasons()
    for crop, label in zip(crops, labels):  # the palette's colours (resized), not indices, nor a blank
        colours = BMPS[names[label]][1].reshape(-1, 3)
        assert crop.std() > 10, names[label]
        np.testing.assert_allclose(crop.reshape(-1, 3).mean(0), colours.mean(0), atol=30, err_msg=names[label])
    assert check_data(load_source(root, val_fraction=0.0), **CHECK).splits[0].class_counts == [1] * len(names)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(tmp_path, fmt):
    frames = [Image.fromarray(np.full((40, 40, 3), colour, np.uint8)) for colour in ((200, 30, 30), (30, 30, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    record = {"image": tf.constant(buffer.getvalue()), "id": tf.constant(fmt)}
    np.testing.assert_allclose(decode_record(record).numpy().mean((0, 1)), (200, 30, 30), atol=8)
    crops, _ = one_epoch(write_files(tmp_path, {f"a/anim.{fmt.lower()}": buffer.getvalue()}))
    np.testing.assert_allclose(crops.mean((0, 1, 2)), (200, 30, 30), atol=8)


# D. Nothing lost without a name --------------------------------------------------------------------------------------

def test_training_names_files_that_fail_after_the_check(tmp_path, caplog):
    good = encode(noise(40, 48))
    corrupt = good[:3] + b"\0" * 300 + good[303:]  # markers look right: only decoding finds out
    root = write_files(tmp_path, good_images() | {"a/corrupt.jpg": corrupt})
    with caplog.at_level(logging.WARNING, logger="vgg_keras.data"):
        images, _ = one_epoch(root)
    assert len(images) == 6
    assert list(SKIPPED.reasons()) == [str(root / "a/corrupt.jpg")]
    assert "TensorFlow could not decode it" in SKIPPED.reasons()[str(root / "a/corrupt.jpg")]
    assert any(str(root / "a/corrupt.jpg") in r.getMessage() for r in caplog.records)


def test_damaged_tfrecord_shards_are_named_with_the_records_lost(tmp_path, caplog, capsys):
    """A flipped byte fails a record's CRC (TensorFlow stops reading that shard there); a truncated shard loses its
    last record. check-data names both with the records lost, training reads the rest and warns."""
    records = tmp_path / "records"
    prepare(load_source(write_files(tmp_path / "folders", good_images(("a", "b"), 6)), val_fraction=0.0),
            records, shards=3)  # 4 records per shard
    flipped, truncated = (records / f"train-0000{i}-of-00003.tfrecord" for i in (0, 1))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING, logger="vgg_keras.data"):
        src = load_source(records)
        images, _ = batches(train_dataset(src, 4, scale=(32, 48), crop=32, seed=0, **PLAIN))
    assert 4 <= len(images) < 12
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert f"{12 - len(images)} of 12 records were not read" in warnings
    assert f"damaged TFRecord shard {truncated}" in warnings and str(flipped) not in warnings  # sizes, on loading
    out = tmp_path / "report.json"
    assert cli.main(["check-data", "--data", str(records), "--scale", "32:48", "--crop", "32",
                     "--json", str(out)]) == 0
    damaged = {entry["shard"]: entry for entry in json.loads(out.read_text())["splits"]["train"]["damaged_shards"]}
    assert set(damaged) == {str(flipped), str(truncated)}
    assert damaged[str(truncated)]["records_lost"] == 1 and 1 <= damaged[str(flipped)]["records_lost"] <= 4
    error = damaged[str(flipped)]["error"].lower()
    assert "corrupted record" in error or "crc" in error, error
    assert f"damaged shard {truncated}: 1 of 4 records lost" in capsys.readouterr().out


def test_tfrecord_metadata_of_another_format_is_a_clear_error(tmp_path):
    (tmp_path / METADATA).write_text(json.dumps({"format": "vgg-keras-tfrecords/0", "class_names": ["a"]}))
    with pytest.raises(ValueError, match=f"--data {tmp_path}: unreadable {METADATA} .*format 'vgg-keras-tfrecords/0'"
                       ".*vgg-keras prepare"):
        load_source(tmp_path)


def test_check_data_json_report(tmp_path):
    root = write_files(tmp_path / "data", good_images(("cat", "dog"), 3) | {"dog/bad.jpg": b"text",
                                                                             "empty/readme.txt": b""})
    out = tmp_path / "report.json"
    out.write_text("previous")
    assert cli.main(["check-data", "--data", str(root), "--val-fraction", "0.34", "--scale", "32:48", "--crop", "32",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["class_names"] == ["cat", "dog"]
    assert report["classes_left_out"] == {str(root / "empty"): "no image file in it"}
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert train["class_counts"] == {"cat": 2, "dog": 2} and val["class_counts"] == {"cat": 1, "dog": 1}
    assert train["images_used"] + val["images_used"] == report["images_used"] == 6
    assert train["skipped"] + val["skipped"] == [{"file": str(root / "dog/bad.jpg"),
                                                  "reason": "not a JPEG, PNG, GIF, BMP or WebP image"}]
    assert not list(tmp_path.glob("*tmp*"))  # written through a temporary file, renamed
