"""The tf.data input pipeline: sources, transforms, statistics, demo data."""

from .check import check_data
from .decode import SKIPPED, decode_record, decode_records
from .pipeline import check_crop, parse_scale, train_dataset, val_dataset
from .sources import load_source
from .stats import IMAGENET_STATS, ColorStats, compute_stats
from .tfrecords import prepare

__all__ = ["IMAGENET_STATS", "SKIPPED", "ColorStats", "check_crop", "check_data", "compute_stats",
           "decode_record", "decode_records", "load_source", "parse_scale", "prepare", "train_dataset", "val_dataset"]
