"""`fit_vs_bare_step`: images/s of `vgg-keras train`'s own loop against bare `train_on_batch` steps of its model.

The loop: `vgg-keras train` (cli.main, so the flags are parsed as a user's are) on the demo data with the default
run's settings (the Makefile's DEMO_FLAGS; data/demo where it exists, else generated into a temporary folder) for
EPOCHS epoch(s). The first WARM_BATCHES steps trace the step and warm tf.data up; from the end of those to the end
of `train()`, minus the validation passes, is the loop: input pipeline, callbacks, checkpoints and the run's files
included. The reference: `train_on_batch` of the same compiled model (same TrainConfig) and batch size on tensors
already in memory, one block of steps before the loop and one after, so that a change of load hits both.
"""

import os
import pathlib
import re
import shlex
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import vgg_keras  # noqa: E402,F401  (before TensorFlow: oneDNN)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from vgg_keras import cli  # noqa: E402
from vgg_keras import train as vtrain  # noqa: E402
from vgg_keras.data import load_source  # noqa: E402
from vgg_keras.data.demo import make_demo_data  # noqa: E402

RECORDS = ["fit_vs_bare_step"]
ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS, WARM_BATCHES, BARE_STEPS = 1, 5, 20


def demo_flags(makefile=ROOT / "Makefile"):
    """The default run's flags: the Makefile's DEMO_FLAGS, split as the shell would."""
    match = re.search(r"^DEMO_FLAGS\s*:?=\s*(.*)$", makefile.read_text(), re.MULTILINE)
    if not match:
        raise ValueError(f"{makefile}: no DEMO_FLAGS line")
    return shlex.split(match.group(1))


def clocks():
    return np.array([time.perf_counter(), time.process_time()])


class LoopTimer(keras.callbacks.Callback):
    """The clocks (wall, process CPU) at the end of the first `warm` training batches, the training batches after
    them, and the clock time spent in validation."""

    def __init__(self, warm):
        super().__init__()
        self.warm, self.batches, self.validation = warm, 0, np.zeros(2)
        self.start = self._test_start = None

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.start is None and self.batches == self.warm:
            self.start, self.batches = clocks(), 0

    def on_test_begin(self, logs=None):
        self._test_start = clocks()

    def on_test_end(self, logs=None):
        if self.start is not None:
            self.validation += clocks() - self._test_start


def bare_images_per_second(model, cfg, classes, steps):
    batch_size, crop = cfg.batch_size, cfg.crop
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, (batch_size, crop, crop, 3)).astype("float32")
    y = rng.integers(0, classes, batch_size)
    model.train_on_batch(x, y)  # warm-up (traced once per model)
    start = clocks()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (clocks() - start)  # [per wall second, per CPU second]


def run():
    flags = demo_flags()
    with tempfile.TemporaryDirectory() as tmp:
        data = ROOT / "data" / "demo"
        if not data.is_dir():
            data = pathlib.Path(tmp) / "demo"
            make_demo_data(str(data))
        timer, bare, models = LoopTimer(WARM_BATCHES), [], []
        original = vtrain.train

        def timed_train(cfg, **kwargs):
            """The CLI's own train() with the timer added; the bare reference from the config it was given."""
            classes = len(load_source(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed).class_names)
            models.append((vtrain.build_and_compile(cfg, classes), cfg, classes))
            bare.append(bare_images_per_second(*models[0], BARE_STEPS))
            return original(cfg, **kwargs, extra_callbacks=[timer])

        argv = ["train", "--config", "A", "--data", str(data), "--run-dir", str(pathlib.Path(tmp) / "run"), *flags,
                "--epochs", str(EPOCHS)]
        vtrain.train = timed_train  # cli.cmd_train imports train() when it runs: it gets this one
        try:
            loop_start = clocks()
            rc = cli.main(argv)
            loop_end = clocks()
        finally:
            vtrain.train = original
        if rc:
            raise RuntimeError(f"vgg-keras {' '.join(argv)} exited with {rc}")
        bare.append(bare_images_per_second(*models[0], BARE_STEPS))
        cfg = models[0][1]
    seconds = loop_end - timer.start - timer.validation  # [wall, CPU]
    images = timer.batches * cfg.batch_size
    (fit, fit_cpu), (reference, reference_cpu) = images / seconds, np.mean(bare, axis=0)
    print(f"   loop {fit:.1f} images/s ({images} images in {seconds[0]:.1f} s); bare train_on_batch "
          f"{[round(float(b[0]), 1) for b in bare]} images/s; whole run {loop_end[0] - loop_start[0]:.0f} s; per "
          f"CPU-second: loop {fit_cpu:.1f}, bare {reference_cpu:.1f}", flush=True)
    return [{
        "name": "fit_vs_bare_step", "ours": float(fit), "reference": float(reference),
        "ratio": float(fit / reference),
        "unit": "images/s", "higher_is_better": True, "target": ">= 0.90",
        "bare_images_per_s": [round(float(b[0]), 2) for b in bare],
        "ratio_per_cpu_second": round(float(fit_cpu / reference_cpu), 3),
        "notes": f"`vgg-keras train --config A` {' '.join(flags)} --epochs {EPOCHS} on the demo data, after the "
                 f"first {WARM_BATCHES} steps (tracing), to the end of train(): validation excluded; input pipeline, "
                 "callbacks, checkpoints, run files included; "
                 f"reference: train_on_batch of the same model and batch {cfg.batch_size} on in-memory tensors, "
                 f"{BARE_STEPS} steps before and {BARE_STEPS} after the run, mean. ratio_per_cpu_second: the same "
                 "with images per CPU-second of the process, which the other jobs of a shared machine disturb less",
    }]


if __name__ == "__main__":
    print(run())
