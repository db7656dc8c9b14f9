"""`train_step_D_vs_keras_applications`: one SGD step of our config D against keras.applications.VGG16.

Same input (224x224, batch 8, fp32), loss and optimizer; the two alternate A B A B after a warm-up and
the ratio of the medians is reported: our builder must cost nothing extra.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import vgg_keras  # noqa: E402

BATCH, SIZE, CLASSES, ROUNDS = 8, 224, 1000, 7


def _compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    return model


def _images_per_second(model, x, y):
    start = time.perf_counter()
    model.train_on_batch(x, y)
    return BATCH / (time.perf_counter() - start)


def run():
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,))
    ours = _compiled(vgg_keras.build_vgg("D", num_classes=CLASSES, init="glorot", dropout=0.0))
    theirs = _compiled(keras.applications.VGG16(weights=None, classes=CLASSES))
    for model in (ours, theirs):  # warm-up: tracing and first allocation
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    ours_ips, theirs_ips = [], []
    for _ in range(ROUNDS):
        ours_ips.append(_images_per_second(ours, x, y))
        theirs_ips.append(_images_per_second(theirs, x, y))
        print(f"   ours {ours_ips[-1]:.2f} img/s   keras.applications {theirs_ips[-1]:.2f} img/s", flush=True)
    ours_median, theirs_median = statistics.median(ours_ips), statistics.median(theirs_ips)
    return [{
        "name": "train_step_D_vs_keras_applications",
        "ours": ours_median,
        "reference": theirs_median,
        "ratio": ours_median / theirs_median,
        "unit": "images/s",
        "higher_is_better": True,
        "notes": f"one SGD step, config D, {SIZE}x{SIZE}, batch {BATCH}, fp32, {ROUNDS} alternating rounds; "
                 "dropout off in ours, as keras.applications has none: the same network, so only the builder differs",
    }]
