"""`vgg-keras prepare`: a source converted to sharded TFRecords (the fast path for large data sets), and the source
that reads them back.

Each record holds the file's encoded bytes unchanged, its label, class name and id. Undecodable files are skipped
and listed in the metadata. Records are written in a seeded random order, round-robin over the shards, so that
reading shards in a shuffled, interleaved order with a modest shuffle buffer mixes the classes well. Shards are
written under a temporary name and renamed when complete; the metadata file, written last, marks a finished
directory (`load_source` recognises the directory by it). It records each shard's record count and size in bytes.

Damage (a flipped byte fails a record's CRC, and TensorFlow stops reading the shard there; a truncated shard loses
its last record) is detected against the metadata: `damaged_shards` reads every shard (for `check-data`, which names
each damaged shard and the records lost), and loading the source compares the shards' sizes (cheap) and warns. The
training pipeline reads each shard with its own `ignore_errors`, so one damaged shard does not stop the others, and
warns at the end of each pass how many records it did not get (`decode.checked_batches`).
"""

import json
import logging
import math
import os
import pathlib

import tensorflow as tf
import tqdm

from .decode import SKIPPED, display_id, robust_map
from .images import decode_rgb
from .sources import SHUFFLE_BUFFER, SPLITS, check_shard, check_split

METADATA = "vgg-keras-tfrecords.json"
FORMAT = "vgg-keras-tfrecords/1"
RECORDS_PER_SHARD = 1024  # default shard count: about 100 MB of ImageNet JPEGs per shard
MAX_OPEN_SHARDS = 16  # shards read at once

log = logging.getLogger("vgg_keras.data")

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "class_name": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}


def is_tfrecord_dir(path):
    return (pathlib.Path(path) / METADATA).is_file()


class TFRecordSource:
    """The shards and metadata that `prepare` wrote in `directory`."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.spec = str(directory)
        try:
            self.metadata = json.loads((self.directory / METADATA).read_text())
            if self.metadata.get("format") != FORMAT:
                raise ValueError(f"format {self.metadata.get('format')!r}, expected {FORMAT!r}")
            self.class_names = list(self.metadata["class_names"])
            self._splits = {split: self.metadata["splits"][split] for split in SPLITS}
            for split in SPLITS:
                int(self._splits[split]["num_examples"]), list(self._splits[split]["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--data {directory}: unreadable {METADATA} ({err}); it is written by "
                             "`vgg-keras prepare` (run it again into a new directory)") from None
        for split in SPLITS:
            for shard, (expected, size) in self._shard_sizes(split).items():
                if size is not None and size != expected:
                    log.warning("damaged TFRecord shard %s: %d bytes, %d when written (run `vgg-keras check-data "
                                "--data %s` for the records lost)", shard, size, expected, directory)

    def _shard_sizes(self, split):
        """{shard path: (size written, size now or None when missing)} of the shards whose size was recorded."""
        entry = self._splits[split]
        sizes = {}
        for name, written in zip(entry["files"], entry.get("shard_bytes", [])):
            path = self.directory / name
            sizes[str(path)] = (written, path.stat().st_size if path.is_file() else None)
        return sizes

    def shard_counts(self, split):
        """{shard path: records written}: from the metadata, or from the round-robin rule `prepare` writes by."""
        entry = self._splits[split]
        names, total = entry["files"], int(entry["num_examples"])
        counts = entry.get("shard_counts") or [total // len(names) + (i < total % len(names))
                                               for i in range(len(names))]
        return {str(self.directory / name): int(count) for name, count in zip(names, counts)}

    def damaged_shards(self, split):
        """{shard path: {"expected": records written, "read": records readable, "error": why}} of the shards of
        `split` that do not read back as written (CRC error, truncation, missing file, extra records). Reads every
        shard once."""
        damaged = {}
        for shard, expected in self.shard_counts(split).items():
            read, error = 0, None
            try:
                for _ in tf.data.TFRecordDataset(shard).as_numpy_iterator():
                    read += 1
            except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
                    tf.errors.InvalidArgumentError) as err:
                error = err.message.strip().splitlines()[0]
            if read != expected or error:
                damaged[display_id(shard)] = {"expected": expected, "read": read,
                                              "error": error or f"{read} records, {expected} written"}
        return damaged

    def num_examples(self, split):
        check_split(split)
        return int(self._splits[split]["num_examples"])

    def records(self, split, shuffle=False, seed=None, shard=None):
        check_split(split)
        shard = check_shard(shard, shuffle, seed)
        paths = [str(self.directory / name) for name in self._splits[split]["files"]]
        files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
        if shuffle:
            files = files.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
        by_file = shard and shards_balance(len(paths), shard[1])
        if by_file:  # every n-th file of the permutation all workers drew alike: only this share is read
            files = files.shard(shard[1], shard[0])
        # A fixed cycle length (not AUTOTUNE) keeps the order the same on every machine. Each shard has its own
        # ignore_errors: a damaged one ends early (counted by the training pipeline), the others are read whole.
        records = files.interleave(lambda path: tf.data.TFRecordDataset(path).ignore_errors(),
                                   cycle_length=max(1, min(len(paths), MAX_OPEN_SHARDS)),
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shard and not by_file:  # too few files to split evenly: read all, parse and decode every n-th record
            records = records.shard(shard[1], shard[0])
        if shuffle:
            records = records.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        return records.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)


def shards_balance(num_files, workers):
    """Whether `num_files` files (of equal size, as `prepare` writes them) split over `workers` by file give every
    worker the same share within 10 %: an equal number each, or at least 10 each."""
    return num_files % workers == 0 or num_files >= 10 * workers


def _parse(serialized):
    example = tf.io.parse_single_example(serialized, _FEATURES)
    return {"image": example["image"], "label": example["label"], "id": example["id"]}


def _serialize(data, label, class_name, file_id):
    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image": feature(data), "label": feature(label), "class_name": feature(class_name.encode()),
        "id": feature(file_id)})).SerializeToString()


def _checked_records(source, split, seed):
    """(record, decodable) for every record of the split, in a seeded random order; decodes each file once."""
    checked = robust_map(source.records(split, shuffle=True, seed=seed), lambda data: tf.shape(decode_rgb(data)),
                         tf.zeros([3], tf.int32))
    return checked.map(lambda shape, record, ok: (record, ok))


def _write_split(source, split, out_dir, num_shards, seed):
    """Write one split's shards; returns its metadata entry and the ids of the files skipped."""
    names = [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(str(out_dir / (name + ".tmp"))) for name in names]
    counts, skipped, written = [0] * len(source.class_names), [], 0
    try:
        records = _checked_records(source, split, seed).as_numpy_iterator()
        for record, ok in tqdm.tqdm(records, total=source.num_examples(split), desc=f"prepare {split}",
                                    unit="img"):
            if not ok:
                skipped.append(display_id(record["id"]))
                continue
            label = int(record["label"])
            writers[written % num_shards].write(
                _serialize(record["image"], label, source.class_names[label], record["id"]))
            counts[label] += 1
            written += 1
    finally:
        for writer in writers:
            writer.close()
    for name in names:
        os.replace(out_dir / (name + ".tmp"), out_dir / name)
    shard_counts = [written // num_shards + (i < written % num_shards) for i in range(num_shards)]
    return {"num_examples": written, "files": names, "class_counts": counts, "shard_counts": shard_counts,
            "shard_bytes": [(out_dir / name).stat().st_size for name in names]}, skipped


def prepare(source, out_dir, shards=None, seed=0):
    """Convert `source` (train and val splits) into TFRecord shards in `out_dir` (new or empty).

    shards: number of training shards (default: one per 1024 images); val gets a proportional number.
    Returns the metadata written (with "skipped": {id: reason}).
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir}: exists and is not an empty directory")
    if shards is not None and (not isinstance(shards, int) or shards < 1):
        raise ValueError(f"--shards {shards!r}: must be a positive integer")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {split: source.num_examples(split) or 0 for split in SPLITS}
    train_shards = shards or max(1, math.ceil(sizes["train"] / RECORDS_PER_SHARD))
    metadata = {"format": FORMAT, "source": source.spec,
                "class_names": list(source.class_names), "splits": {}, "skipped": {}}
    for split in SPLITS:
        num_shards = max(1, round(train_shards * sizes[split] / max(sizes["train"], 1)))
        metadata["splits"][split], skipped = _write_split(source, split, out_dir, num_shards, seed)
        reasons = SKIPPED.reasons()
        metadata["skipped"].update({file_id: reasons.get(file_id, "undecodable") for file_id in skipped})
    from ..runs import write_json_atomic  # here: runs imports this package

    write_json_atomic(out_dir / METADATA, metadata)
    return metadata
