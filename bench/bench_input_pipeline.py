"""input_pipeline_vs_naive and input_pipeline_per_core: our training input pipeline against a straightforward one.

Both read the ~1000 real JPEGs of ../shared/data/imagenet-samples (a class-folder view of symlinks, one class per
WordNet id), with S drawn in [256, 512], crop 224, batches of 32 and AUTOTUNE parallelism. Ours is
`train_dataset` (bad-file check, the crop window alone decoded and resized, flip, PCA colour shift, mean
subtraction); the naive one decodes the whole JPEG, resizes it to S, crops at random and flips. Both are run once
to warm up (page cache, tracing), then alternate A B B A ...; medians are kept.

`input_pipeline_vs_naive` compares images per wall-clock second. `input_pipeline_per_core` is images per second
per CPU core used: images per CPU-second of this process (user + system time of all its threads), the figure that
says how many cores feed a given rate (cores = images/s / per-core), and one that varies less than wall-clock rates
on a shared machine. Its reference is the naive pipeline's; the target is ours >= 400.
"""

import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from vgg_keras.data import load_source, train_dataset  # noqa: E402
from vgg_keras.data.images import rescaled_size  # noqa: E402

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"
SCALE, CROP, BATCH, ROUNDS = (256, 512), 224, 32, 5
RECORDS = ["input_pipeline_vs_naive", "input_pipeline_per_core"]


def class_folder_view(samples, root):
    """root/<wnid>/<file> symlinks to the flat folder of samples."""
    for path in sorted(samples.glob("*.JPEG")):
        (root / path.name.split("_")[0]).mkdir(exist_ok=True)
        (root / path.name.split("_")[0] / path.name).symlink_to(path)


def naive_dataset(paths, labels, seed=0):
    """The straightforward pipeline: list of files, read, decode all, resize to S, random crop, flip."""
    def transform(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        smallest_side = tf.random.uniform([], SCALE[0], SCALE[1] + 1, dtype=tf.int32)
        shape = tf.shape(image)
        image = tf.image.resize(image, rescaled_size(shape[0], shape[1], smallest_side))
        image = tf.image.random_crop(image, [CROP, CROP, 3])
        return tf.image.random_flip_left_right(image), label

    return (tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=seed)
            .map(transform, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE))


def images_per_second(dataset):
    """(images per wall-clock second, images per CPU second of this process, images)."""
    start, cpu_start, count = time.perf_counter(), time.process_time(), 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start), count


def run():
    if not SAMPLES.is_dir():
        raise FileNotFoundError(f"{SAMPLES} does not exist (the imagenet-samples of ../shared)")
    with tempfile.TemporaryDirectory() as tmp:
        class_folder_view(SAMPLES, pathlib.Path(tmp))
        src = load_source(tmp, val_fraction=0.0)
        paths = sorted(str(path) for path in pathlib.Path(tmp).glob("*/*.JPEG"))
        labels = [src.class_names.index(pathlib.Path(path).parent.name) for path in paths]
        pipelines = {"ours": lambda: train_dataset(src, BATCH, scale=SCALE, crop=CROP, seed=0),
                     "naive": lambda: naive_dataset(paths, labels)}
        for build in pipelines.values():  # warm both: page cache, tracing, first allocations
            images_per_second(build())
        rates, cpu_rates = {name: [] for name in pipelines}, {name: [] for name in pipelines}
        for i in range(ROUNDS):
            for name in (["ours", "naive"] if i % 2 == 0 else ["naive", "ours"]):  # alternate which goes first
                build = pipelines[name]
                rate, cpu_rate, count = images_per_second(build())
                rates[name].append(rate)
                cpu_rates[name].append(cpu_rate)
                print(f"   {name}: {rate:.1f} images/s, {cpu_rate:.1f} images per CPU-second ({count} images)",
                      flush=True)
    ours, naive = statistics.median(rates["ours"]), statistics.median(rates["naive"])
    cpu_ours, cpu_naive = statistics.median(cpu_rates["ours"]), statistics.median(cpu_rates["naive"])
    setting = (f"{count} imagenet-samples JPEGs, S in [256, 512], crop 224, batch 32, AUTOTUNE, "
               f"{len(os.sched_getaffinity(0))} cores, medians of {ROUNDS} alternating runs after a warm-up of each")
    return [{
        "name": "input_pipeline_vs_naive", "ours": ours, "reference": naive, "ratio": ours / naive,
        "unit": "images/s", "higher_is_better": True, "target": ">= 1.5",
        "runs": {name: [round(r) for r in values] for name, values in rates.items()},
        "notes": f"{setting}; per CPU-second of the process: ours {cpu_ours:.0f}, naive {cpu_naive:.0f} "
                 f"(ratio {cpu_ours / cpu_naive:.2f})",
    }, {
        "name": "input_pipeline_per_core", "ours": cpu_ours, "reference": cpu_naive, "ratio": cpu_ours / cpu_naive,
        "unit": "images/s per core", "higher_is_better": True, "target": "ours >= 400",
        "runs": {name: [round(r) for r in values] for name, values in cpu_rates.items()},
        "notes": f"images per CPU-second of this process (all threads, user + system), {setting}; reference: the "
                 "naive pipeline's. Cores needed to feed R images/s: R / ours",
    }]


if __name__ == "__main__":
    print(run())
