"""Training: the plateau schedule, tf.distribute equivalence, crash-resume, pre-init and fine-tuning."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from PIL import Image

import vgg_keras
from vgg_keras.train import PlateauSchedule, TrainConfig, start_weights

from conftest import make_run_dir

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def make_folder_dataset(root, classes=3, per_class=8, size=(48, 40)):
    """DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg of random images: enough to run a pipeline."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


TINY = ["--config", "A", "--scale", "36:44", "--crop", "32", "--batch-size", "4", "--init", "glorot",
        "--lr", "0.001"]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vgg_keras.cli", *args], env=ENV, capture_output=True,
                          text=True, **kwargs)


# --- the learning-rate schedule -------------------------------------------------------------------------

class _FakeModel:
    def __init__(self, lr):
        self.optimizer = keras.optimizers.SGD(learning_rate=lr)
        self.stop_training = False


def _drive(schedule, values):
    lrs = []
    for epoch, value in enumerate(values):
        schedule.on_epoch_end(epoch, {"val_top1": value, "loss": 1.0})
        lrs.append(float(schedule.model.optimizer.learning_rate))
        if schedule.model.stop_training:
            break
    return lrs


def test_plateau_divides_the_learning_rate_by_ten():
    schedule = PlateauSchedule(patience=2, max_reductions=3)
    schedule.set_model(_FakeModel(0.01))
    lrs = _drive(schedule, [0.1, 0.2, 0.3, 0.3, 0.29, 0.4, 0.5])
    np.testing.assert_allclose(lrs, [0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001], rtol=1e-6)
    assert schedule.reductions == 1 and not schedule.model.stop_training


def test_plateau_after_the_third_reduction_ends_training():
    schedule = PlateauSchedule(patience=1, max_reductions=3)
    schedule.set_model(_FakeModel(0.01))
    lrs = _drive(schedule, [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4])
    np.testing.assert_allclose(lrs, [0.01, 0.001, 1e-4, 1e-5, 1e-5], rtol=1e-6)
    assert schedule.model.stop_training and schedule.ended_on_plateau and schedule.reductions == 3


def test_plateau_state_round_trips():
    first = PlateauSchedule(patience=3)
    first.set_model(_FakeModel(0.01))
    _drive(first, [0.5, 0.4, 0.4])
    second = PlateauSchedule(patience=3)
    second.restore(json.loads(json.dumps(first.state())))
    assert second.state() == first.state() == {"best": 0.5, "wait": 2, "reductions": 0}


# --- tf.distribute --------------------------------------------------------------------------------------

TWO_REPLICAS = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras, vgg_keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, size=(8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    def one_step(strategy):
        with strategy.scope():
            model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), dropout=0.0,
                                        weight_decay=5e-4, init="glorot", seed=1)
            model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model.fit(data, epochs=1, verbose=0)
        return model.get_weights(), strategy.num_replicas_in_sync
    two, n_two = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    one, n_one = one_step(tf.distribute.get_strategy())
    print("REPLICAS", n_two, n_one)
    print("MAXDIFF", max(float(np.abs(a - b).max()) for a, b in zip(two, one)))
    print("MAXSTEP", max(float(np.abs(a).max()) for a in one))
""")


def test_two_replicas_give_the_same_step_as_one():
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["REPLICAS"] == "2 1"
    # Tolerance: float32 sums over two half-batches in another order; the weights are O(0.1).
    assert float(lines["MAXDIFF"]) < 1e-5


# Several workers (MultiWorkerMirroredStrategy): tests/test_multiworker.py


# --- crash safety ---------------------------------------------------------------------------------------

def test_sigkill_then_rerun_resumes_without_repeating_an_epoch(tmp_path):
    data = make_folder_dataset(tmp_path / "data", per_class=8)
    args = ["train", *TINY, "--data", str(data), "--run-dir", str(tmp_path / "run"), "--epochs", "4"]
    process = subprocess.Popen([sys.executable, "-m", "vgg_keras.cli", *args], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "run" / "checkpoints" / "epoch_0001.weights.h5"
    deadline = time.time() + 240
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_checkpoint.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert not state.get("finished") and 1 <= state["epoch"] < 4

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming {tmp_path / 'run'} after epoch {state['epoch']}" in result.stdout
    with open(tmp_path / "run" / "log.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [1, 2, 3, 4]
    for name in ("config.json", "class_names.json", "stats.json", "best.keras", "history.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert not [f for f in os.listdir(tmp_path / "run" / "checkpoints") if f.startswith(".tmp")]

    again = run_cli(*args)
    assert again.returncode == 2 and "holds a finished run" in again.stderr


def test_resume_with_other_settings_is_refused(tmp_path):
    data = make_folder_dataset(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": "A", "data": str(data), "crop": 32, "lr": 0.5}))
    result = run_cli("train", *TINY, "--data", str(data), "--run-dir", str(run), "--epochs", "1")
    assert result.returncode == 2 and "lr: 0.5 -> 0.001" in result.stderr


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_folder_dataset(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    ok = run_cli("train", *TINY, "--data", str(data), "--run-dir", str(run), "--epochs", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    # a second run in another directory explodes: the learning rate is absurd
    bad = run_cli("train", *TINY[:-2], "--lr", "1e30", "--data", str(data), "--run-dir", str(tmp_path / "bad"),
                  "--epochs", "2")
    assert bad.returncode == 2 and "NaN" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoints" / "epoch_0001.weights.h5").exists()
    assert (run / "checkpoints" / "epoch_0001.weights.h5").exists()


def test_argument_errors(tmp_path):
    data = make_folder_dataset(tmp_path / "data", per_class=2)
    cases = {
        ("--crop", "64"): "--crop 64 is larger than the smallest scale 36 (--scale)",
        ("--batch-size", "0"): "--batch-size 0",
        ("--config", "Q"): "unknown VGG configuration 'Q'",
    }
    for extra, message in cases.items():
        result = run_cli("train", *TINY, *extra, "--data", str(data), "--run-dir", str(tmp_path / "r"))
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


# --- pre-initialisation and fine-tuning -----------------------------------------------------------------

def _config(**kwargs):
    return TrainConfig(crop=32, scale=(40, 48), **kwargs)


def test_init_from_copies_the_papers_layers_from_a_run(tmp_path):
    source = make_run_dir(tmp_path / "a", config="A", num_classes=3, seed=5)
    target = vgg_keras.build_vgg("B", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=6)
    before = target.get_layer("block1_conv2").get_weights()[0].copy()
    copied = start_weights(target, _config(config="B", init_from=str(source)), 3)
    assert copied == list(vgg_keras.model.PRE_INIT_LAYERS)
    a = keras.saving.load_model(source / "best.keras")
    for name in copied:
        np.testing.assert_array_equal(target.get_layer(name).get_weights()[0], a.get_layer(name).get_weights()[0])
    np.testing.assert_array_equal(target.get_layer("block1_conv2").get_weights()[0], before)


def test_finetune_copies_every_layer(tmp_path):
    source = make_run_dir(tmp_path / "d", config="B", num_classes=3, seed=5)
    target = vgg_keras.build_vgg("B", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=6)
    copied = start_weights(target, _config(config="B", finetune_from=str(source)), 3)
    b = keras.saving.load_model(source / "best.keras")
    assert len(copied) == 13
    for ours, theirs in zip(target.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


def test_source_runs_that_do_not_fit_are_refused(tmp_path):
    a = make_run_dir(tmp_path / "a", config="A", num_classes=3)
    b = make_run_dir(tmp_path / "b", config="B", num_classes=3)
    target = vgg_keras.build_vgg("B", num_classes=4, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="that run has 3 classes, this data set has 4"):
        start_weights(target, _config(config="B", init_from=str(a)), 4)
    target = vgg_keras.build_vgg("D", num_classes=3, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="that run trained config B, this one is D"):
        start_weights(target, _config(config="D", finetune_from=str(b)), 3)
    with pytest.raises(ValueError, match="copies from a trained A, that run is B"):
        start_weights(target, _config(config="D", init_from=str(b)), 3)


def test_mixed_precision_keeps_a_float32_softmax(tmp_path):
    data = make_folder_dataset(tmp_path / "data", per_class=4)
    result = run_cli("train", *TINY, "--mixed-precision", "--data", str(data), "--run-dir", str(tmp_path / "run"),
                     "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision_policy"] == "mixed_bfloat16"  # the CPU's choice; GPUs get mixed_float16
    model = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("predictions").compute_dtype == "float32"


def test_xla_flag_sets_jit_compile_explicitly():
    from vgg_keras.train import build_and_compile

    for xla in (True, False):
        model = build_and_compile(TrainConfig(config="A", crop=32, scale=(40, 40), xla=xla), 3)
        assert model.jit_compile is xla


# --- the default demo run learns ----------------------------------------------------------------------------


def makefile_demo_flags():
    """The flags `make train` passes on the demo data (Makefile's DEMO_FLAGS), split like a shell would."""
    makefile = (pathlib.Path(__file__).resolve().parents[1] / "Makefile").read_text()
    (flags,) = [line.split(":=", 1)[1].split() for line in makefile.splitlines() if line.startswith("DEMO_FLAGS")]
    return flags


def test_default_demo_run_learns_in_a_short_version(tmp_path):
    """`make train`'s recipe (DEMO_FLAGS, config A) on two of the demo's shapes for 10 short epochs.

    Why two classes: from scratch, the ten-class run stays at chance for ~20 000 images (~5 minutes here)
    before it takes off (its full figure is in the README); two classes leave chance within ~200 steps.
    """
    from vgg_keras.data.demo import make_demo_data

    make_demo_data(tmp_path / "demo", train_per_class=480, val_per_class=50, classes=("circle", "cross"))
    flags = makefile_demo_flags()
    assert {"--scale", "--crop", "--batch-size", "--init"} <= set(flags)  # the recipe is really read
    result = run_cli("train", "--config", "A", "--data", str(tmp_path / "demo"), "--run-dir", str(tmp_path / "run"),
                     *flags, "--epochs", "10")  # the last --epochs wins: 10 x 30 steps of 32
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "log.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == list(range(1, 11))
    best = max(float(row["val_top1"]) for row in history)
    # chance is 0.5; 100 validation images put 0.75 five standard deviations above it
    assert best >= 0.75, f"best val top-1 {best:.2f} after 10 epochs; history: {history}"
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
