"""`vgg-keras check-data`: run the whole training transform once over every image of a source and report what was
used, what was skipped and why, and how many images each class has."""

import dataclasses

import tensorflow as tf
import tqdm

from .decode import SKIPPED, robust_map
from .pipeline import check_crop, element_seeds, stateless_seed, train_transform
from .sources import SPLITS
from .stats import IMAGENET_STATS


@dataclasses.dataclass
class SplitReport:
    split: str
    class_counts: list  # images used per label
    skipped: dict  # {file id: reason}

    @property
    def used(self):
        return sum(self.class_counts)


@dataclasses.dataclass
class DataReport:
    source: str
    class_names: list
    splits: list  # of SplitReport

    @property
    def used(self):
        return sum(split.used for split in self.splits)

    def format(self):
        lines = [f"{self.source}: {len(self.class_names)} classes"]
        for split in self.splits:
            lines.append(f"{split.split}: {split.used} images used, {len(split.skipped)} files skipped")
            lines += [f"  skipped {file_id}: {reason}" for file_id, reason in sorted(split.skipped.items())]
        width = max(len(name) for name in self.class_names)
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{split.split:>7}" for split in self.splits))
        for label, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{split.class_counts[label]:>7}" for split in self.splits))
        return "\n".join(lines)


def _check_split(source, split, scale, crop, stats, seed):
    # The mean of each crop is kept so that the transform's result is used and cannot be pruned away.
    records = tf.data.Dataset.zip(source.records(split), element_seeds(seed))
    results = robust_map(records, lambda data, element_seed: tf.reduce_mean(
        train_transform(data, stateless_seed(element_seed), scale, crop, stats)), tf.constant(0.0))
    results = results.map(lambda mean, record, ok: (record["id"], record["label"], ok)).prefetch(tf.data.AUTOTUNE)
    counts, skipped = [0] * len(source.class_names), []
    for file_id, label, ok in tqdm.tqdm(results.as_numpy_iterator(), total=source.num_examples(split),
                                        desc=f"check {split}", unit="img"):
        if ok:
            counts[label] += 1
        else:
            skipped.append(file_id.decode("utf-8", "replace"))
    reasons = SKIPPED.reasons()
    return SplitReport(split, counts, {file_id: reasons.get(file_id, "undecodable") for file_id in skipped})


def check_data(source, scale=(256, 256), crop=224, stats=IMAGENET_STATS, seed=0):
    """Run the training transform over every split of `source` once; returns a DataReport (printable by .format())."""
    scale = check_crop(scale, crop)
    return DataReport(source.spec, list(source.class_names),
                      [_check_split(source, split, scale, crop, stats, seed) for split in SPLITS])
