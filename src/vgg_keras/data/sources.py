"""Where images come from: class folders, TFRecord shards written by `vgg-keras prepare`, or a TFDS data set.

Every source has `class_names` (index = label), `records(split, shuffle, seed, shard)` -> tf.data.Dataset of
{"image": encoded bytes, "label": int64, "id": path or key} and `num_examples(split)`; `load_source(spec)` picks the
kind from the spec. Records carry encoded bytes: decoding is the pipeline's job (`decode.py`), so that a bad file
is skipped and reported there rather than failing here.
"""

import os
import pathlib

import numpy as np
import tensorflow as tf

from .decode import SKIPPED

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")  # compared case-insensitively
SHUFFLE_BUFFER = 2048  # records (encoded bytes) held for shuffling where whole-split shuffles are not possible
TFDS_PREFIX = "tfds:"


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def check_shard(shard, shuffle, seed):
    """`shard` = (index, count): this input pipeline reads the index-th of `count` disjoint shares of the split
    (one per worker, see distribute.WorkerShare); None reads it all. A shuffled split is partitioned after a
    shuffle that every worker must draw alike, hence the seed."""
    if shard is None:
        return None
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: expected (index, count) with 0 <= index < count")
    if shuffle and seed is None:
        raise ValueError("a shuffled split is sharded after a shuffle all workers draw alike: give it a seed")
    return int(index), int(count)


class FolderSource:
    """ImageNet-style class folders: ROOT/<class>/<image>, or ROOT/train/<class>/... and ROOT/val/<class>/...

    Without val/, a seeded split stratified by class keeps `val_fraction` of each class for validation.
    """

    def __init__(self, root, val_fraction=0.1, seed=0):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
        self.root = pathlib.Path(root)
        self.spec = str(root)
        train_dir = self.root / "train" if (self.root / "train").is_dir() else self.root
        self.class_names = sorted(entry.name for entry in os.scandir(train_dir)
                                  if entry.is_dir() and not entry.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"--data {root}: no class folders in {train_dir} (expected {train_dir}/<class>/<image>)")
        train = self._scan(train_dir)
        if train_dir != self.root and (self.root / "val").is_dir():
            self._files = {"train": train, "val": self._scan(self.root / "val")}
        else:
            self._files = _stratified_split(train, val_fraction, seed)
        if not self._files["train"][0]:
            raise ValueError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                             f"of {train_dir}")

    def _scan(self, split_dir):
        """(paths, labels) of the image files under split_dir/<class>/, sorted."""
        paths, labels = [], []
        known = set(self.class_names)
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if entry.name not in known:
                raise ValueError(f"--data {self.root}: class folder {entry.path} has no counterpart in the "
                                 "training classes")
            label = self.class_names.index(entry.name)
            for directory, subdirs, files in os.walk(entry.path, followlinks=True):
                subdirs.sort()
                for name in sorted(files):
                    path = os.path.join(directory, name)
                    if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    if os.access(path, os.R_OK):
                        paths.append(path)
                        labels.append(label)
                    else:  # reading it in the pipeline would raise; skip it here, where its path is known
                        SKIPPED.add(path, "unreadable file (permissions, or a broken link)")
        return paths, labels

    def num_examples(self, split):
        check_split(split)
        return len(self._files[split][0])

    def records(self, split, shuffle=False, seed=None, shard=None):
        check_split(split)
        shard = check_shard(shard, shuffle, seed)
        paths, labels = self._files[split]
        files = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
        if shuffle:  # shuffle names, not bytes: a whole-split shuffle costs almost nothing
            files = files.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
        if shard:  # every n-th name of the permutation all workers drew alike: only this share is read
            files = files.shard(shard[1], shard[0])
        # Files that cannot be read were left out by _scan; one that vanishes later fails the read, and the
        # pipeline's ignore_errors drops it (TensorFlow's warning names it).
        return files.map(lambda path, label: {"image": tf.io.read_file(path), "label": label, "id": path},
                         num_parallel_calls=tf.data.AUTOTUNE)


def _stratified_split(files, val_fraction, seed):
    """{"train": (paths, labels), "val": (paths, labels)}: round(val_fraction * n) random files of each class to val."""
    paths, labels = np.array(files[0], dtype=object), np.array(files[1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(paths), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_val[rng.permutation(members)[:int(round(val_fraction * len(members)))]] = True
    return {split: (list(paths[mask]), list(labels[mask])) for split, mask in (("train", ~is_val), ("val", is_val))}


class TFDSSource:
    """A TensorFlow Datasets data set, 'tfds:NAME[/CONFIG]', prepared on first use (imagenet2012 from the ILSVRC tars
    in `manual_dir`). Images are read as encoded bytes (SkipDecoding). Our "val" is TFDS's "validation" split, else
    its "test" split, else the last `val_fraction` of "train"."""

    def __init__(self, name, data_dir=None, manual_dir=None, val_fraction=0.1):
        import tensorflow_datasets as tfds

        self.name = name
        self.spec = TFDS_PREFIX + name
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
            self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        except (AssertionError, OSError, ValueError, tfds.core.registered.DatasetNotFoundError) as err:
            raise ValueError(f"--data {TFDS_PREFIX}{name}: cannot prepare it with TFDS: {err}") from err
        features = dict(self.builder.info.features.items())
        self._image_key, self._label_key = self.builder.info.supervised_keys or ("image", "label")
        if not isinstance(features.get(self._image_key), tfds.features.Image) or not isinstance(
                features.get(self._label_key), tfds.features.ClassLabel):
            raise ValueError(f"--data {TFDS_PREFIX}{name}: not an image classification data set "
                             f"(needs an Image feature {self._image_key!r} and a ClassLabel {self._label_key!r})")
        self.class_names = list(features[self._label_key].names)
        self._splits = self._split_names(val_fraction)

    def _split_names(self, val_fraction):
        known = set(self.builder.info.splits)
        if not known or "validation" in known:  # an unknown split list (mocked data) is taken to have one
            return {"train": "train", "val": "validation"}
        if "test" in known:
            return {"train": "train", "val": "test"}
        percent = int(round(100 * val_fraction))
        return {"train": f"train[:{100 - percent}%]", "val": f"train[{100 - percent}%:]"}

    def num_examples(self, split):
        check_split(split)
        try:
            return int(self.builder.info.splits[self._splits[split]].num_examples)
        except (KeyError, ValueError, TypeError):
            return None

    def records(self, split, shuffle=False, seed=None, shard=None):
        import tensorflow_datasets as tfds

        check_split(split)
        shard = check_shard(shard, shuffle, seed)
        name = self._splits[split]
        if shard:  # a fixed contiguous 1/count of the records, of which TFDS reads only the files that hold it
            name = tfds.even_splits(name, n=shard[1])[shard[0]]
        ds = self.builder.as_dataset(
            split=name, shuffle_files=shuffle,
            decoders={self._image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True))
        if shuffle:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        return ds.map(self._record, num_parallel_calls=tf.data.AUTOTUNE)

    def _record(self, example):
        return {"image": example[self._image_key],
                "label": tf.cast(example[self._label_key], tf.int64),
                "id": example["file_name"] if "file_name" in example else example["tfds_id"]}


def load_source(spec, data_dir=None, manual_dir=None, val_fraction=0.1, seed=0):
    """The source named by `spec` (the --data flag): "tfds:NAME[/CONFIG]", a directory written by
    `vgg-keras prepare`, or a class-folder directory."""
    from .tfrecords import TFRecordSource, is_tfrecord_dir  # here: tfrecords imports this module

    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        return TFDSSource(spec[len(TFDS_PREFIX):], data_dir=data_dir, manual_dir=manual_dir,
                          val_fraction=val_fraction)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--data {spec}: no such directory (nor a tfds:NAME data set)")
    if is_tfrecord_dir(spec):
        return TFRecordSource(spec)
    return FolderSource(spec, val_fraction=val_fraction, seed=seed)
