"""Data sources: class folders (with and without val/), TFRecord shards written by `prepare`, and TFDS data sets
(mocked, and a tiny imagenet2012 built from fake ILSVRC tars) -- all offline."""

import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from test_data_fixtures import batches, encode, fresh_skipped, good_images, noise, write_files  # noqa: F401

from vgg_keras import cli
from vgg_keras.data import load_source, prepare, train_dataset
from vgg_keras.data.sources import FolderSource, TFDSSource
from vgg_keras.data.tfrecords import METADATA, TFRecordSource


def contents(src, split, **options):
    """{id: (bytes, label)} of a split's records."""
    return {r["id"].decode(): (r["image"], int(r["label"])) for r in src.records(split, **options).as_numpy_iterator()}


def order_of(src, seed):
    """The ids of the shuffled training records."""
    return [r["id"].decode() for r in src.records("train", shuffle=True, seed=seed).as_numpy_iterator()]


# Class folders -------------------------------------------------------------------------------------------------------

def test_train_and_val_folders(tmp_path):
    files = good_images(("cat", "dog"), 2, prefix="train/") | good_images(("cat", "dog"), 1, prefix="val/")
    files |= {"train/dog/UPPER.JPEG": encode(noise(20, 20)), "train/dog/notes.txt": b"x", "train/cat/.hidden.jpg": b"",
              "train/cat/deeper/more.Png": encode(noise(20, 20), "PNG")}
    root = write_files(tmp_path, files)
    src = load_source(root)
    assert isinstance(src, FolderSource) and src.class_names == ["cat", "dog"]
    assert (src.num_examples("train"), src.num_examples("val")) == (6, 2)
    train = contents(src, "train")
    assert train[str(root / "train/dog/UPPER.JPEG")] == (files["train/dog/UPPER.JPEG"], 1)  # .JPEG: any case
    assert train[str(root / "train/cat/deeper/more.Png")][1] == 0
    assert not any(name.endswith((".txt", ".hidden.jpg")) for name in train)
    assert {label for _, label in contents(src, "val").values()} == {0, 1}


def test_stratified_seeded_validation_split(tmp_path):
    root = write_files(tmp_path, good_images(("a", "b", "c"), 10))
    src = load_source(root, val_fraction=0.2, seed=0)
    train, val = contents(src, "train"), contents(src, "val")
    assert len(val) == 6 and sorted(label for _, label in val.values()) == [0, 0, 1, 1, 2, 2]  # 20 % of each class
    assert not set(train) & set(val) and len(train) + len(val) == 30
    assert set(contents(load_source(root, val_fraction=0.2, seed=0), "val")) == set(val)  # same seed, same split
    assert set(contents(load_source(root, val_fraction=0.2, seed=1), "val")) != set(val)
    assert load_source(root, val_fraction=0.0).num_examples("val") == 0


@pytest.mark.parametrize("files, spec, error, message", [
    ({}, "missing", FileNotFoundError, "--data .*missing: no such directory"),
    ({"x.jpg": b""}, "", ValueError, "no class folders"),
    ({"a/notes.txt": b""}, "", ValueError, "no image files"),
    ({"train/a/1.jpg": b"", "val/b/1.jpg": b""}, "", ValueError, "class folder .*val/b has no counterpart"),
])
def test_folder_errors(tmp_path, files, spec, error, message):
    write_files(tmp_path, files)
    with pytest.raises(error, match=message):
        load_source(tmp_path / spec)


def test_bad_arguments(tmp_path):
    root = write_files(tmp_path, good_images())
    with pytest.raises(ValueError, match="--val-fraction 1.5"):
        load_source(root, val_fraction=1.5)
    with pytest.raises(ValueError, match="split 'validation'"):
        load_source(root).records("validation")


def test_shuffled_records_are_reproducible(tmp_path):
    src = load_source(write_files(tmp_path, good_images(("a", "b"), 8)))
    assert order_of(src, 3) == order_of(src, 3) != order_of(src, 4)
    assert sorted(order_of(src, 3)) == sorted(contents(src, "train"))


# TFRecords -----------------------------------------------------------------------------------------------------------

def test_tfrecord_round_trip(tmp_path):
    files = good_images(("a", "b", "c"), 5) | {"b/broken.jpg": b"\xff\xd8\xff\xe0 cut"}
    folder = load_source(write_files(tmp_path / "folder", files), val_fraction=0.2)
    metadata = prepare(folder, tmp_path / "records", shards=3)
    src = load_source(tmp_path / "records")
    assert isinstance(src, TFRecordSource) and src.class_names == ["a", "b", "c"]
    for split in ("train", "val"):
        expected = {k: v for k, v in contents(folder, split).items() if not k.endswith("broken.jpg")}
        assert contents(src, split) == expected  # bytes and labels identical
        assert src.num_examples(split) == len(expected)
        assert metadata["splits"][split]["class_counts"] == np.bincount(
            [label for _, label in expected.values()], minlength=3).tolist()
    assert list(metadata["skipped"]) == [str(tmp_path / "folder/b/broken.jpg")]
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == sorted(
        [METADATA] + [f"train-0000{i}-of-00003.tfrecord" for i in range(3)] + ["val-00000-of-00001.tfrecord"])
    assert json.loads((tmp_path / "records" / METADATA).read_text()) == metadata
    shard = str(tmp_path / "records/val-00000-of-00001.tfrecord")
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(shard))).numpy())
    assert set(example.features.feature) == {"image", "label", "class_name", "id"}
    assert order_of(src, 5) == order_of(src, 5) != order_of(src, 6)


def test_prepare_refuses_a_non_empty_directory_and_bad_shards(tmp_path):
    folder = load_source(write_files(tmp_path / "folder", good_images()))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--out .*out: exists and is not an empty directory"):
        prepare(folder, tmp_path / "out")
    with pytest.raises(ValueError, match="--shards 0"):
        prepare(folder, tmp_path / "new", shards=0)


def test_prepare_command_then_train_from_records(tmp_path, capsys):
    write_files(tmp_path / "folder", good_images(per_class=4))
    assert not cli.main(["prepare", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "rec"),
                         "--val-fraction", "0.25"])  # exit status 0
    assert "train 6 images in 1 shards, val 2 images in 1 shards; 0 undecodable files skipped" in (
        capsys.readouterr().out)
    images, labels = batches(train_dataset(load_source(tmp_path / "rec"), 4, scale=(32, 40), crop=32, seed=0))
    assert images.shape == (6, 32, 32, 3) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


# TFDS ----------------------------------------------------------------------------------------------------------------

def test_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = load_source("tfds:mnist")
        assert isinstance(src, TFDSSource) and src.class_names == [str(i) for i in range(10)]
        records = list(src.records("val").as_numpy_iterator())
        assert len(records) == 6 and all(r["image"][:4] == b"\x89PNG" for r in records)  # encoded bytes
        assert all(0 <= r["label"] < 10 for r in records)
        images, labels = batches(train_dataset(src, 4, scale=(28, 36), crop=28, seed=0))
    assert images.shape == (6, 28, 28, 3) and labels.dtype == np.int64  # grayscale digits as RGB


def test_tfds_unknown_dataset():
    with pytest.raises(ValueError, match="--data tfds:no_such_set_xyz: cannot prepare it"):
        load_source("tfds:no_such_set_xyz")


def _tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_ilsvrc(manual_dir, wnids=("n01440764", "n01443537"), per_class=3, val=3):
    """ILSVRC2012_img_train.tar (a tar of per-class tars of JPEGs) and ILSVRC2012_img_val.tar, tiny; returns
    {file name: bytes}. The builder takes the validation labels from the list shipped with TFDS, by sorted name."""
    manual_dir.mkdir(parents=True)
    images = {}
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
        for k, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(per_class):
                    images[f"{wnid}_{i}.JPEG"] = encode(noise(24 + i, 30, seed=10 * k + i))
                    _tar_member(class_tar, f"{wnid}_{i}.JPEG", images[f"{wnid}_{i}.JPEG"])
            _tar_member(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i in range(val):
            name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            images[name] = encode(noise(30, 24, seed=100 + i))
            _tar_member(val_tar, name, images[name])
    return images


def test_tfds_imagenet2012_from_fake_tars(tmp_path):
    images = fake_ilsvrc(tmp_path / "manual")
    src = load_source("tfds:imagenet2012", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    assert len(src.class_names) == 1000 and src.class_names[:2] == ["n01440764", "n01443537"]
    assert (src.num_examples("train"), src.num_examples("val")) == (6, 3)
    train = contents(src, "train")
    assert train == {name: (data, int(name.startswith("n01443537"))) for name, data in images.items()
                     if not name.startswith("ILSVRC")}
    shipped = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()[:3]
    val = contents(src, "val")
    assert {name: label for name, (_, label) in val.items()} == {
        f"ILSVRC2012_val_{i + 1:08d}.JPEG": src.class_names.index(wnid) for i, wnid in enumerate(shipped)}
    assert all(val[name][0] == images[name] for name in val)
    again = load_source("tfds:imagenet2012", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
    assert again.num_examples("train") == 6  # prepared once, then read


class _TinyBuilder(tfds.core.GeneratorBasedBuilder):
    """A two-class image data set built offline; subclasses choose which splits it has."""

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_SIZES = {}

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(names=["a", "b"])})
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, size) for split, size in self.SPLIT_SIZES.items()}

    def _generate_examples(self, split, size):
        for i in range(size):
            yield f"{split}{i}", {"image": noise(20, 24, seed=i), "label": i % 2}


class TinyTrainTest(_TinyBuilder):
    SPLIT_SIZES = {"train": 10, "test": 4}


class TinyTrainOnly(_TinyBuilder):
    SPLIT_SIZES = {"train": 10}


def test_tfds_val_is_test_split_else_the_end_of_train(tmp_path):
    with_test = load_source("tfds:tiny_train_test", data_dir=tmp_path)
    assert (with_test.num_examples("train"), with_test.num_examples("val")) == (10, 4)
    assert all("-test.tfrecord" in key for key in contents(with_test, "val"))  # TFDS ids name the split file
    train_only = load_source("tfds:tiny_train_only", data_dir=tmp_path, val_fraction=0.2)
    assert (train_only.num_examples("train"), train_only.num_examples("val")) == (8, 2)
    train, val = contents(train_only, "train"), contents(train_only, "val")
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)  # train[:80%] and train[80%:]


def test_evaluation_uses_exactly_the_images_training_held_out(tmp_path):
    """No val/ folder: evaluation rebuilds the seeded split from the run's recorded options."""
    from conftest import make_run_dir

    from vgg_keras.evaluate import load_eval_source
    from vgg_keras.runs import load_run

    root = write_files(tmp_path / "data", good_images(("a", "b", "c"), 8))
    run_dir = make_run_dir(tmp_path / "run")
    config = json.loads((run_dir / "config.json").read_text())
    config.update(data=str(root), val_fraction=0.25, seed=7, data_dir=None, manual_dir=None)
    (run_dir / "config.json").write_text(json.dumps(config))
    _, source = load_eval_source(load_run(str(run_dir)))
    trained = load_source(root, val_fraction=0.25, seed=7)  # as train.train loads it
    held_out = set(contents(source, "val"))
    assert held_out == set(contents(trained, "val")) and len(held_out) == 6
    assert not held_out & set(contents(trained, "train"))
    assert held_out != set(contents(load_source(root, val_fraction=0.25, seed=0), "val"))  # the seed matters
