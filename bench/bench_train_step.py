"""One SGD step of config D (224x224, batch 8, fp32), measured three ways.

- `train_step_D_vs_keras_applications`: our config D against keras.applications.VGG16, same input, loss and
  optimizer, alternating A B A B after a warm-up; ratio of the medians. With dropout and weight decay off in ours
  (keras.applications has neither) the two graphs are identical, layer for layer: the ratio is 1 within the
  step-to-step noise, and says that the builder adds nothing to the step.
- `train_step_vs_machine_peak`: the achieved FLOP/s of our step (3x the forward multiply-adds x 2 FLOP: the forward
  pass, and the backward pass's gradients with respect to the activations and the weights) over the FLOP/s of a large
  float32 matmul (sgemm, TensorFlow's and numpy's, the faster of the two) measured in the same run, between the
  rounds of steps, so that the load of a shared machine weighs on both.
- `onednn_speedup`: the same step in a fresh process with oneDNN as the package sets it, against one with
  TF_ENABLE_ONEDNN_OPTS=0, the two kinds of process alternating (on off off on).
"""

import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import vgg_keras  # noqa: E402  (before TensorFlow: oneDNN)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

RECORDS = ["train_step_D_vs_keras_applications", "train_step_vs_machine_peak", "onednn_speedup"]
BATCH, SIZE, CLASSES, ROUNDS = 8, 224, 1000, 5
SGEMM_N = 4096
ONEDNN_ROUNDS, ONEDNN_STEPS = 2, 1


def _compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    return model


def our_model():
    return _compiled(vgg_keras.build_vgg("D", num_classes=CLASSES, init="glorot", dropout=0.0))


def batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    return x, rng.integers(0, CLASSES, size=(BATCH,))


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process) of fn(*args)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_seconds(model, x, y):
    return timed(model.train_on_batch, x, y)[0]


def sgemm_flops(n=SGEMM_N):
    """{"tensorflow": FLOP/s, "numpy": FLOP/s, "tensorflow_per_cpu_s": FLOP per CPU-second}: the best of 3 float32
    n x n matmuls each (2 n^3 FLOP)."""
    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (1, 2))
    ta, tb = tf.constant(a), tf.constant(b)
    tf.linalg.matmul(ta, tb).numpy()  # warm-up
    best = {}
    for name, fn in (("tensorflow", lambda: tf.linalg.matmul(ta, tb).numpy()), ("numpy", lambda: a @ b)):
        times = np.array([timed(fn) for _ in range(3)])
        best[name] = 2 * n ** 3 / times[:, 0].min()
        if name == "tensorflow":
            best["tensorflow_per_cpu_s"] = 2 * n ** 3 / times[:, 1].min()
    return best


def onednn_process(onednn):
    """Seconds per step (median of ONEDNN_STEPS, after a warm-up step) in a fresh process, and its CPU line."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if not onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    out = subprocess.run([sys.executable, __file__, "--step", str(ONEDNN_STEPS)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    return float(out[-2]), out[-1]


def run():
    x, y = batch()
    ours = our_model()
    theirs = _compiled(keras.applications.VGG16(weights=None, classes=CLASSES))
    for model in (ours, theirs):  # warm-up: tracing and first allocation
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    ours_s, theirs_s, ours_cpu, sgemm = [], [], [], {"tensorflow": [], "numpy": [], "tensorflow_per_cpu_s": []}
    for i in range(ROUNDS):
        pair = [(ours, ours_s), (theirs, theirs_s)]
        for model, times in pair[::1 if i % 2 == 0 else -1]:  # alternate which goes first
            wall, cpu = timed(model.train_on_batch, x, y)
            times.append(wall)
            if model is ours:
                ours_cpu.append(cpu)
        if i % 2 == 0:
            for name, flops in sgemm_flops().items():
                sgemm[name].append(flops)
        print(f"   ours {BATCH / ours_s[-1]:.2f} img/s   keras.applications {BATCH / theirs_s[-1]:.2f} img/s",
              flush=True)
    ours_ips, theirs_ips = BATCH / statistics.median(ours_s), BATCH / statistics.median(theirs_s)
    step_flop = 3 * 2 * vgg_keras.multiply_adds(ours) * BATCH
    achieved = step_flop / statistics.median(ours_s)
    sgemm_median = {name: statistics.median(values) for name, values in sgemm.items()}
    per_cpu_ratio = step_flop / statistics.median(ours_cpu) / sgemm_median.pop("tensorflow_per_cpu_s")
    peak_name = max(sgemm_median, key=sgemm_median.get)
    peak = sgemm_median[peak_name]
    print(f"   step {achieved / 1e9:.1f} GFLOP/s; sgemm {SGEMM_N}^2: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in sgemm_median.items()), flush=True)

    onednn = {True: [], False: []}
    lines = {}
    for onednn_on in [True, False, False, True][:2 * ONEDNN_ROUNDS]:
        seconds, lines[onednn_on] = onednn_process(onednn_on)
        onednn[onednn_on].append(seconds)
        print(f"   oneDNN {'on ' if onednn_on else 'off'}: {seconds:.2f} s per step", flush=True)
    on_s, off_s = statistics.median(onednn[True]), statistics.median(onednn[False])
    return [{
        "name": "train_step_D_vs_keras_applications", "ours": ours_ips, "reference": theirs_ips,
        "ratio": ours_ips / theirs_ips, "unit": "images/s", "higher_is_better": True,
        "notes": f"one SGD step, config D, {SIZE}x{SIZE}, batch {BATCH}, fp32, medians of {ROUNDS} alternating "
                 "rounds. With dropout and weight decay off in ours (keras.applications has neither) the two "
                 "graphs are identical layer for layer: a ratio of 1 within the step-to-step noise, not a cost or "
                 "a gain of the builder",
    }, {
        "name": "train_step_vs_machine_peak", "ours": achieved / 1e9, "reference": peak / 1e9,
        "ratio": achieved / peak, "unit": "GFLOP/s", "higher_is_better": True, "target": ">= 0.60",
        "sgemm_gflops": {k: round(v / 1e9, 1) for k, v in sgemm_median.items()},
        "step_gflop": round(step_flop / 1e9, 1),
        "ratio_per_cpu_second": round(per_cpu_ratio, 3),
        "notes": f"one SGD step of config D, {SIZE}x{SIZE}, batch {BATCH}, fp32, counted as 3 x forward "
                 f"multiply-adds x 2 = {step_flop / 1e9:.0f} GFLOP, at the median step time of {ROUNDS}; reference: "
                 f"float32 {SGEMM_N}x{SGEMM_N} matmul ({peak_name}, the faster), median of {(ROUNDS + 1) // 2} "
                 "measurements between the rounds of steps. ratio_per_cpu_second: the same ratio with FLOP per "
                 "CPU-second of the process (the step's against TensorFlow's matmul), which the other jobs of a "
                 "shared machine disturb less",
    }, {
        "name": "onednn_speedup", "ours": BATCH / on_s, "reference": BATCH / off_s, "ratio": off_s / on_s,
        "unit": "images/s", "higher_is_better": True,
        "seconds_per_step": {"onednn_as_set": onednn[True], "onednn_off": onednn[False]},
        "cpu_line_off": lines.get(False),
        "notes": f"the step of train_step_vs_machine_peak in fresh processes, oneDNN as vgg_keras sets it against "
                 f"TF_ENABLE_ONEDNN_OPTS=0, alternating (on off off on), medians of {ONEDNN_ROUNDS} processes "
                 f"each, {ONEDNN_STEPS} steps per process after a warm-up step; ~1 on a CPU where TensorFlow "
                 "enables oneDNN by itself",
    }]


def _step_process(steps):
    """`--step N`: print seconds per step (median of N after a warm-up) and the CPU line, for onednn_speedup."""
    from vgg_keras import machine

    x, y = batch()
    model = our_model()
    model.train_on_batch(x, y)
    print(statistics.median(step_seconds(model, x, y) for _ in range(steps)))
    print(machine.cpu_line())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        _step_process(int(sys.argv[2]))
    else:
        print(run())
