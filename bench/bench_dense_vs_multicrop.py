"""dense_vs_multicrop_cost: how much cheaper dense evaluation is than multi-crop, measured against the arithmetic.

Config D (1000 classes, random Glorot weights: the cost does not depend on the values), Q = {256, 384, 512} with
flips: dense = 3 whole images and their mirrors, multicrop = 150 crops of 224 px. Per-image wall time of multicrop
divided by that of dense, on a few 4:3 photos of ../shared/data/imagenet-samples, after a warm-up that traces both
networks; the methods alternate scale by scale, so that a change of load on a shared CPU hits both.
`bound` is the same ratio of multiply-adds (FC-as-conv layers included); dense evaluation wastes nothing of what
the arithmetic saves (no retracing, no padding, flips batched) when ours / bound is near 1. The two methods
alternate their order from image to image.

That ratio divides two measured times, so a slower multi-crop would raise it. `dense_throughput_vs_fc_batch`
judges the dense path against the machine instead: its multiply-adds per second against those of a fixed
reference measured in the same run, between the images: the plain network (FC layers) on one full batch of
CROP_BATCH crops of 224 px, the best case of the machine's convolution and matmul kernels for this network.
"""

import pathlib
import time

import numpy as np
import tensorflow as tf

import vgg_keras
from vgg_keras import evaluate as ev
from vgg_keras.data.images import decode_rgb

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"
SCALES = (256, 384, 512)
IMAGES = 2  # multicrop costs ~30-40 s an image on a 2-core CPU
RECORDS = ["dense_vs_multicrop_cost", "dense_throughput_vs_fc_batch"]
SHAPE = (375, 500)  # 4:3 landscape, the commonest ImageNet shape: the bound is ~5.3 there


def photos(count):
    """The first `count` images (by name) of shape SHAPE, and one more for the warm-up."""
    chosen = []
    for path in sorted(SAMPLES.glob("*.JPEG")):
        data = tf.io.read_file(str(path))
        if tuple(tf.image.extract_jpeg_shape(data)[:2].numpy()) == SHAPE:
            chosen.append((path.name, decode_rgb(data)))
            if len(chosen) == count + 1:
                return chosen
    raise FileNotFoundError(f"{SAMPLES}: fewer than {count + 1} images of {SHAPE[0]}x{SHAPE[1]} pixels")


def timed(fn, *args):
    """[wall seconds, process CPU seconds] of fn(*args)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def run():
    scorer = ev.ModelScorer(vgg_keras.build_vgg("D", num_classes=1000, init="glorot", seed=0))
    (_, warm_up), *images = photos(IMAGES)
    ev.dense_scores(scorer, warm_up, SCALES)
    ev.multi_crop_scores(scorer, warm_up, SCALES[:1])
    # Per image, the sum over scales of each method's time; the methods alternate scale by scale (every ~10 s),
    # so that the other jobs of a shared CPU slow both alike.
    dense, multicrop = np.zeros((len(images), 2)), np.zeros((len(images), 2))
    crops = tf.random.stateless_uniform([ev.CROP_BATCH, scorer.crop, scorer.crop, 3], [0, 1], -120, 120)
    scorer.crop_posteriors(crops)  # warm-up of the reference (the crop net is already traced)
    fc_batch = []
    for i, (_, image) in enumerate(images):
        for q in SCALES:
            methods = [(ev.dense_scores, dense), (ev.multi_crop_scores, multicrop)]
            for method, times in methods[::1 if i % 2 == 0 else -1]:
                times[i] += timed(method, scorer, image, (q,))
        fc_batch.append(timed(scorer.crop_posteriors, crops))
    assert scorer.trace_counts() == {"crop": 1, "dense": 1}, scorer.trace_counts()
    dense_macs = ev.method_multiply_adds(scorer, *SHAPE, "dense", SCALES)
    multicrop_macs = ev.method_multiply_adds(scorer, *SHAPE, "multicrop", SCALES)
    (dense_wall, dense_cpu), (multicrop_wall, multicrop_cpu) = dense.mean(axis=0), multicrop.mean(axis=0)
    measured, bound = multicrop_wall / dense_wall, multicrop_macs / dense_macs
    dense_rate = dense_macs / dense_wall
    fc_rate = ev.CROP_BATCH * vgg_keras.multiply_adds(scorer.model) / float(np.median([t[0] for t in fc_batch]))
    return [{
        "name": "dense_vs_multicrop_cost",
        "ours": round(measured, 3),
        "reference": round(bound, 3),
        "ratio": round(measured / bound, 3),
        "unit": "x",
        "higher_is_better": True,
        "bound": round(bound, 3),
        "dense_s_per_image": round(dense_wall, 2),
        "multicrop_s_per_image": round(multicrop_wall, 2),
        "cpu_time_ratio": round(multicrop_cpu / dense_cpu, 3),
        "fastest_image_ratio": round(multicrop[:, 0].min() / dense[:, 0].min(), 3),
        "wall_s": {"dense": dense[:, 0].round(2).tolist(), "multicrop": multicrop[:, 0].round(2).tolist()},
        "dense_gmacs_per_image": round(dense_macs / 1e9, 1),
        "multicrop_gmacs_per_image": round(multicrop_macs / 1e9, 1),
        "images": [name for name, _ in images],
        "notes": f"config D, 1000 classes, Q={{256,384,512}} with flips, {len(images)} photos of "
                 f"{SHAPE[1]}x{SHAPE[0]}: mean per-image wall time of multicrop (150 crops) / of dense (6 whole "
                 "images), the two alternating which goes first; reference = bound = the same ratio of "
                 "multiply-adds (FC-as-conv included); target ratio >= 0.9",
    }, {
        "name": "dense_throughput_vs_fc_batch",
        "ours": round(dense_rate / 1e9, 2),
        "reference": round(fc_rate / 1e9, 2),
        "ratio": round(dense_rate / fc_rate, 3),
        "unit": "G multiply-adds/s",
        "higher_is_better": True,
        "multicrop_gmacs_per_s": round(multicrop_macs / multicrop_wall / 1e9, 2),
        "fc_batch_s": [round(t[0], 2) for t in fc_batch],
        "notes": f"dense evaluation's multiply-adds per wall-clock second (config D, Q={{256,384,512}} with flips, "
                 f"the photos of dense_vs_multicrop_cost) against the plain network on one batch of "
                 f"{ev.CROP_BATCH} random {scorer.crop}x{scorer.crop} crops, timed once after each photo (median)",
    }]
