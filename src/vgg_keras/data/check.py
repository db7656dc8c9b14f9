"""`vgg-keras check-data`: run the whole training transform once over every image of a source and report what was
used, what was skipped and why, how many images each class has, the class folders left out, the files noted (links
to a file already used, images without a label) and the damaged TFRecord shards; as text and as JSON (`--json`)."""

import dataclasses

import tensorflow as tf
import tqdm

from .decode import DROPPED, SKIPPED, describe, display_id, read_file, robust_map
from .pipeline import check_crop, element_seeds, stateless_seed, train_transform
from .sources import SPLITS
from .stats import IMAGENET_STATS


@dataclasses.dataclass
class SplitReport:
    split: str
    class_counts: list  # images used per label
    skipped: dict  # {file id: reason}
    damaged_shards: dict = dataclasses.field(default_factory=dict)  # {shard: {"expected", "read", "error"}}

    @property
    def used(self):
        return sum(self.class_counts)

    @property
    def records_lost(self):
        return sum(shard["expected"] - shard["read"] for shard in self.damaged_shards.values())


@dataclasses.dataclass
class DataReport:
    source: str
    class_names: list
    splits: list  # of SplitReport
    left_out: dict = dataclasses.field(default_factory=dict)  # {class folder: why it got no label}
    notes: dict = dataclasses.field(default_factory=dict)  # {file id: why it is not used (not an error)}
    layout: str = None

    @property
    def used(self):
        return sum(split.used for split in self.splits)

    def format(self):
        layout = f" ({self.layout} layout)" if self.layout else ""
        lines = [f"{self.source}: {len(self.class_names)} classes{layout}"]
        lines += [f"  class folder left out: {folder}: {why}" for folder, why in sorted(self.left_out.items())]
        lines += [f"  not used: {file_id}: {why}" for file_id, why in sorted(self.notes.items())]
        for split in self.splits:
            lines.append(f"{split.split}: {split.used} images used, {len(split.skipped)} files skipped")
            lines += [f"  skipped {file_id}: {reason}" for file_id, reason in sorted(split.skipped.items())]
            for shard, damage in sorted(split.damaged_shards.items()):
                lines.append(f"  damaged shard {shard}: {damage['expected'] - damage['read']} of "
                             f"{damage['expected']} records lost ({damage['error']})")
        width = max(len(name) for name in self.class_names)
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{split.split:>7}" for split in self.splits))
        for label, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{split.class_counts[label]:>7}" for split in self.splits))
        return "\n".join(lines)

    def to_json(self):
        """The report as JSON-ready data: per split the images used, per-class counts, the skipped files with their
        reasons and the damaged shards with the records lost; the classes left out and why."""
        return {
            "source": self.source, "layout": self.layout, "class_names": self.class_names,
            "images_used": self.used, "classes_left_out": self.left_out, "files_not_used": self.notes,
            "splits": {split.split: {
                "images_used": split.used,
                "class_counts": dict(zip(self.class_names, split.class_counts)),
                "skipped": [{"file": file_id, "reason": reason} for file_id, reason in sorted(split.skipped.items())],
                "damaged_shards": [{"shard": shard, "records_lost": damage["expected"] - damage["read"], **damage}
                                   for shard, damage in sorted(split.damaged_shards.items())],
                "records_lost": split.records_lost,
            } for split in self.splits},
        }

    def write_json(self, path):
        """Write `to_json()` to `path` atomically (a half-written report never replaces a good one)."""
        from ..runs import write_json_atomic  # here: runs imports this package

        write_json_atomic(path, self.to_json())


def _check_split(source, split, scale, crop, stats, seed):
    # The mean of each crop is kept so that the transform's result is used and cannot be pruned away.
    records = tf.data.Dataset.zip(source.records(split), element_seeds(seed))
    results = robust_map(records, lambda data, element_seed: tf.reduce_mean(
        train_transform(data, stateless_seed(element_seed), scale, crop, stats)), tf.constant(0.0))
    results = results.map(lambda mean, record, ok: (record["id"], record["label"], ok)).prefetch(tf.data.AUTOTUNE)
    counts, skipped, seen = [0] * len(source.class_names), [], set()
    for file_id, label, ok in tqdm.tqdm(results.as_numpy_iterator(), total=source.num_examples(split),
                                        desc=f"check {split}", unit="img"):
        seen.add(file_id)
        if ok:
            counts[label] += 1
        else:
            skipped.append(display_id(file_id))
    reasons = SKIPPED.reasons()
    report = {file_id: reasons.get(file_id, "undecodable") for file_id in skipped}
    listed = source.file_ids(split) if hasattr(source, "file_ids") else None
    for file_id in listed or ():  # dropped before they could be checked (a file that vanished)
        if file_id not in seen:
            report[display_id(file_id)] = describe(DROPPED, read_file(file_id))
    damaged = source.damaged_shards(split) if hasattr(source, "damaged_shards") else {}
    return SplitReport(split, counts, report, damaged)


def check_data(source, scale=(256, 256), crop=224, stats=IMAGENET_STATS, seed=0):
    """Run the training transform over every split of `source` once; returns a DataReport (printable by .format(),
    JSON by .to_json() / .write_json(path))."""
    scale = check_crop(scale, crop)
    return DataReport(source.spec, list(source.class_names),
                      [_check_split(source, split, scale, crop, stats, seed) for split in SPLITS],
                      left_out=dict(getattr(source, "left_out", {})), notes=dict(getattr(source, "notes", {})),
                      layout=getattr(source, "layout", None))
