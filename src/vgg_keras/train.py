"""Training: the paper's recipe (Section 3.1 / PAPER.md section 2) under tf.distribute, resumable after a crash.

Entry point: `train(TrainConfig(...))`. One epoch is one `model.fit` call, so that each epoch draws its
own augmentation (seed + epoch) and a resumed run continues exactly where the last checkpoint left it; each call
is told the run's real epoch total (Keras shows "Epoch 3/10") and `OneEpochPerFit` ends it after its epoch.

The run directory (see runs.py) gets, besides config.json / class_names.json / stats.json / best.keras:
    checkpoints/epoch_NNNN.weights.h5   model + optimizer state after epoch NNNN (the last two kept)
    state.json                          completed epochs, schedule state, per-epoch history, finished flag
    log.csv, tensorboard/ (TensorBoard's own event files, appended), history.png (written last, by finish())
Every other file is written to a temporary name and renamed, so a kill at any moment leaves the last good one.
"""

import csv
import dataclasses
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from . import data as vdata
from .configs import check_config
from .data.stats import IMAGENET_STATS, ColorStats
from .distribute import (InputShareLog, WorkerShare, distributed_epoch, distribution_strategy,
                         fix_keras_for_multi_worker, is_chief, on_chief, sync_from_chief, worker_failures)
from .machine import cpu_line
from .model import build_vgg, initialize_from
from .runs import atomic_path, load_run, write_json_atomic


@dataclasses.dataclass
class TrainConfig:
    """Every number of the paper's recipe is a default here (PAPER.md section 2)."""

    config: str = "A"
    data: str = ""
    run_dir: str = ""
    data_dir: str | None = None
    manual_dir: str | None = None
    scale: tuple = (256, 256)  # (Smin, Smax); equal for single-scale training
    crop: int = 224
    epochs: int = 74
    batch_size: int = 256  # global batch, split over the replicas; the learning rate is not rescaled
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4  # Caffe semantics, see model.CAFFE_TO_KERAS_L2
    dropout: float = 0.5
    init: str = "paper"
    init_std: float = 0.01
    init_from: str | None = None  # run of a trained A: pre-initialise the paper's 7 layers
    finetune_from: str | None = None  # run of the same config: start from all its weights
    plateau_patience: int = 2  # epochs without a better val top-1 before the lr is divided by 10
    max_lr_reductions: int = 3  # the paper decreased it 3 times; the next plateau ends training
    stats: str | None = None  # ColorStats JSON from `vgg-keras stats`; None: ImageNet's
    val_fraction: float = 0.1
    layout: str = "auto"  # class folders: "classes", "splits" or "auto" (see data/sources.py)
    val_labels: str | None = None  # labels of a flat val/ folder (LOC_val_solution.csv or file,label rows)
    mixed_precision: bool = False
    xla: bool = False
    seed: int = 0

    @property
    def val_q(self):
        """Centre-crop validation at the middle of the training scales (Q = S for a fixed S)."""
        return validation_scale(self.scale, self.crop)


def validation_scale(scale, crop):
    """The test scale Q (pixels, int) of centre-crop validation: the middle of the training scales (Q = S for a
    fixed S), at least the crop. scale: (Smin, Smax)."""
    return max(int(crop), round((scale[0] + scale[1]) / 2))


# ---------------------------------------------------------------------------------------------------------
# The learning-rate schedule


class PlateauSchedule(keras.callbacks.Callback):
    """ReduceLROnPlateau on validation top-1, with the paper's ending: the plateau after the last reduction
    stops training. Its counters are plain attributes so that checkpoints can save and restore them."""

    def __init__(self, monitor="val_top1", factor=0.1, patience=2, max_reductions=3, min_delta=1e-4):
        super().__init__()
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.max_reductions, self.min_delta = max_reductions, min_delta
        self.best, self.wait, self.reductions, self.ended_on_plateau = -math.inf, 0, 0, False

    def state(self):
        """The counters, and whether the plateau ended training (checkpointed with the epoch that ended it, so
        that a run killed before `finish()` does not train on when it resumes)."""
        return {"best": self.best, "wait": self.wait, "reductions": self.reductions,
                "ended_on_plateau": self.ended_on_plateau}

    def restore(self, state):
        self.best, self.wait, self.reductions = state["best"], state["wait"], state["reductions"]
        self.ended_on_plateau = state.get("ended_on_plateau", False)  # absent from older state files

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        value = logs.get(self.monitor)
        if value is None and not np.isfinite(logs.get("loss", np.nan)):
            return  # a NaN loss stopped the epoch before validation: EpochCheckpoint reports it
        if value is None:
            raise KeyError(f"PlateauSchedule monitors {self.monitor!r}, which the logs lack: {sorted(logs)}")
        logs["lr"] = learning_rate(self.model)
        if value > self.best + self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        self.wait = 0
        if self.reductions >= self.max_reductions:
            self.model.stop_training = self.ended_on_plateau = True
            print(f"\nEpoch {epoch + 1}: {self.monitor} plateaued after {self.reductions} reductions: stopping")
            return
        new_lr = logs["lr"] * self.factor
        self.model.optimizer.learning_rate.assign(new_lr)
        self.reductions += 1
        print(f"\nEpoch {epoch + 1}: {self.monitor} plateaued: learning rate {logs['lr']:.3g} -> {new_lr:.3g}")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and the run directory


class RunDirectory:
    """Reads and writes a run directory; only the chief worker writes."""

    KEEP_CHECKPOINTS = 2

    def __init__(self, path, is_chief=True):
        self.path, self.is_chief = path, is_chief
        self.checkpoints = os.path.join(path, "checkpoints")

    def file(self, name):
        return os.path.join(self.path, name)

    def load_state(self):
        if not os.path.exists(self.file("state.json")):
            return None
        with open(self.file("state.json")) as f:
            return json.load(f)

    def prepare(self, resolved_config, class_names, stats):
        """Create the directory for a new run, or check that an existing one is this run, unfinished."""
        state = self.load_state()
        if state and state.get("finished"):
            raise FileExistsError(f"{self.path} holds a finished run ({state['epoch']} epochs); "
                                  "choose another --run-dir or delete it")
        if os.path.exists(self.file("config.json")):
            with open(self.file("config.json")) as f:
                previous = json.load(f)
            changed = {k: (previous.get(k), v) for k, v in resolved_config.items()
                       if k not in ("replicas",) and previous.get(k) != v}
            if changed:
                diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(f"{self.path} holds an unfinished run with other settings ({diff}); "
                                 "rerun with the same settings to resume, or choose another --run-dir")
        if self.is_chief:
            os.makedirs(self.checkpoints, exist_ok=True)
            write_json_atomic(self.file("config.json"), resolved_config)
            write_json_atomic(self.file("class_names.json"), list(class_names))
            write_json_atomic(self.file("stats.json"), dataclasses.asdict(stats))
        return state

    def save_model(self, model, name):
        """`model.save` to a temporary `.keras` file, then rename over `name`."""
        if self.is_chief:
            with atomic_path(self.file(name)) as tmp:
                model.save(tmp)

    def save_epoch(self, model, epoch, state):
        """Checkpoint after `epoch` (0-based): weights + optimizer first, then the state that points to it."""
        name = f"epoch_{epoch + 1:04d}.weights.h5"
        if self.is_chief:
            with atomic_path(os.path.join(self.checkpoints, name)) as tmp:
                model.save_weights(tmp)
            write_json_atomic(self.file("state.json"), {**state, "checkpoint": name})
            self._write_csv(state["history"])
            for old in sorted(f for f in os.listdir(self.checkpoints) if f.startswith("epoch_"))[
                    :-self.KEEP_CHECKPOINTS]:
                os.remove(os.path.join(self.checkpoints, old))

    def restore_epoch(self, model, state):
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.checkpoints, state["checkpoint"]))

    def _write_csv(self, history):
        """log.csv is rewritten from the checkpointed history: each completed epoch exactly once."""
        columns = list(history[0]) if history else ["epoch"]
        with atomic_path(self.file("log.csv")) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    def finish(self, state):
        """history.png, then the finished flag: a run marked finished has all its files."""
        if self.is_chief:
            with atomic_path(self.file("history.png")) as tmp:
                plot_history(state["history"], tmp)
            write_json_atomic(self.file("state.json"), {**state, "finished": True})


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch with a finite loss: checkpoint, state, log, and best.keras when the monitored validation
    metric (val top-1; the task's `monitor`) improved. `best_top1` holds that metric's best value."""

    def __init__(self, run_dir, schedule, history, best_top1, monitor="val_top1"):
        super().__init__()
        self.run_dir, self.schedule, self.history, self.best_top1 = run_dir, schedule, history, best_top1
        self.monitor, self.nan_epoch = monitor, None

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if not np.isfinite(logs.get("loss", np.nan)):
            self.nan_epoch = epoch + 1
            self.model.stop_training = True
            return
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in sorted(logs.items())}}
        self.history.append(row)
        if logs.get(self.monitor, -1) > self.best_top1:
            self.best_top1 = logs[self.monitor]
            self.run_dir.save_model(self.model, "best.keras")
        self.run_dir.save_epoch(self.model, epoch, self.state(epoch + 1))

    def state(self, epochs_done):
        return {"epoch": epochs_done, "schedule": self.schedule.state(), "best_top1": self.best_top1,
                "lr": learning_rate(self.model), "history": self.history}


class OneEpochPerFit(keras.callbacks.Callback):
    """Ends a `fit(initial_epoch=e, epochs=total)` call after its one epoch. `train` tells each call the run's
    total so that Keras' progress shows "Epoch e+1/total"; this stop is not the plateau's (`PlateauSchedule.
    ended_on_plateau`) nor the NaN's (`EpochCheckpoint.nan_epoch`), which `train` reads instead of
    `model.stop_training`."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def plot_history(history, path):
    """history.png (PNG at `path`): each logged quantity (loss, top-1, top-5; a localisation run's IoU) and the
    learning rate per epoch, training and validation in one panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    keys = sorted({k.removeprefix("val_") for k in (history[0] if history else {})} - {"epoch", "lr"}) or ["loss"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * len(keys) + 4, 3.5))
    for ax, key in zip(axes, keys + ["lr"]):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in (history[0] if history else {}):
                ax.plot(epochs, [row[prefix + key] for row in history], style, label=prefix + key)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[-1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Distribution, model, data


def set_precision(mixed):
    """mixed_float16 on GPUs, mixed_bfloat16 where bf16 is the native choice (CPU, TPU); else float32."""
    if not mixed:
        keras.mixed_precision.set_global_policy("float32")
    elif tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return keras.mixed_precision.global_policy().name


def build_and_compile(cfg, num_classes):
    model = build_vgg(cfg.config, num_classes=num_classes, input_shape=(cfg.crop, cfg.crop, 3),
                      dropout=cfg.dropout, weight_decay=cfg.weight_decay, init=cfg.init,
                      init_std=cfg.init_std, seed=cfg.seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5")],
        # Keras turns "auto" off under tf.distribute: say what is meant
        jit_compile=cfg.xla,
    )
    return model


def load_source_run(path, cfg, num_classes, flag):
    """Load --init-from / --finetune-from RUN, refusing one whose config or classes do not fit."""
    source = load_run(path)
    source_config = source.config.get("config") or "unknown"
    classes = source.model.output_shape[-1]
    if classes != num_classes:
        raise ValueError(f"{flag} {path}: that run has {classes} classes, this data set has {num_classes}")
    if flag == "--finetune-from" and source_config != cfg.config:
        raise ValueError(f"{flag} {path}: that run trained config {source_config}, this one is {cfg.config}; "
                         "fine-tuning needs the same configuration (use --init-from to pre-initialise from A)")
    if flag == "--init-from" and source_config not in ("A", "A-LRN"):
        raise ValueError(f"{flag} {path}: pre-initialisation copies from a trained A, that run is {source_config}")
    return source.model


def start_weights(model, cfg, num_classes):
    """Apply --init-from or --finetune-from; returns the names of the layers copied."""
    if cfg.init_from:
        return initialize_from(model, load_source_run(cfg.init_from, cfg, num_classes, "--init-from"))
    if cfg.finetune_from:
        source = load_source_run(cfg.finetune_from, cfg, num_classes, "--finetune-from")
        names = [layer.name for layer in model.layers if layer.weights]
        return initialize_from(model, source, layer_names=names)
    return []


def check_arguments(cfg, replicas):
    cfg.config = check_config(cfg.config)
    if not cfg.data:
        raise ValueError("--data is required: a class-folder directory, a TFRecord directory or tfds:NAME")
    if not cfg.run_dir:
        raise ValueError("--run-dir is required")
    if cfg.batch_size < 1 or cfg.batch_size % replicas:
        raise ValueError(f"--batch-size {cfg.batch_size} does not divide over {replicas} replicas: "
                         f"use a multiple of {replicas}")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.init_from and cfg.finetune_from:
        raise ValueError("--init-from and --finetune-from exclude each other")
    vdata.check_crop(tuple(cfg.scale), cfg.crop)  # Smin <= Smax, and the crop fits inside Smin


def epoch_of(strategy, make_dataset, num_examples, batch_size):
    """(distributed dataset, steps) for one epoch of `num_examples` records over all workers.

    make_dataset(input_context, per_replica_batch) builds one input pipeline's (one worker's) batches from its own
    share of the records (distribute.WorkerShare): each worker reads and decodes only its 1/N. A known length gives
    Keras a progress bar and every worker the same number of steps, ceil(num_examples / global batch); the repeat
    makes up for skipped bad files, so that no worker runs out before the others.
    """
    def one_pipeline(input_context, per_replica_batch):
        dataset = make_dataset(input_context, per_replica_batch)
        return dataset.repeat() if num_examples else dataset

    steps = math.ceil(num_examples / batch_size) if num_examples else None
    return distributed_epoch(strategy, one_pipeline, batch_size), steps


def augmentation_seed(epoch_seed, share):
    """The seed of a worker's crops, flips and colour shifts: the epoch's seed on a single worker, another one per
    worker (the records' shuffle keeps the epoch's seed, so that the shares partition the split)."""
    return epoch_seed if share.count == 1 else epoch_seed * share.count + share.index


def seed_dropout(model, seed):
    """Set every dropout layer's seed generator to (seed, its index): the masks of an epoch become a function of
    `seed` (int), like its augmentation. Keras draws these generators' state at random and does not checkpoint
    it, so without this a resumed run (or a rerun) would drop other units than the uninterrupted one."""
    generators = [layer.seed_generator for layer in model.layers if getattr(layer, "seed_generator", None)]
    for index, generator in enumerate(generators):
        generator.state.assign(np.array([seed, index], dtype=generator.state.dtype))


def learning_rate(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class ClassificationTask:
    """What `train` trains: the model, the start weights, the datasets and the validation metric that picks
    best.keras and drives the plateau schedule. Localisation supplies another (localisation.LocalisationTask).

    The datasets are per input pipeline (per worker): `share` is that pipeline's `distribute.WorkerShare` of the
    source and `batch` its per-replica batch size; `num_examples` counts the whole split (all workers)."""

    monitor = "val_top1"

    def build(self, cfg, num_classes):
        return build_and_compile(cfg, num_classes)

    def start_weights(self, model, cfg, num_classes):
        return start_weights(model, cfg, num_classes)

    def num_examples(self, source, split):
        return source.num_examples(split)

    def train_dataset(self, share, batch, cfg, stats, seed):
        """One epoch of `share`'s training batches, augmented with `seed`."""
        return vdata.train_dataset(share, batch, scale=tuple(cfg.scale), crop=cfg.crop, stats=stats, seed=seed)

    def val_dataset(self, share, batch, cfg, stats):
        return vdata.val_dataset(share, batch, crop=cfg.crop, q=cfg.val_q, stats=stats)


# ---------------------------------------------------------------------------------------------------------
# The entry point


def train(cfg, return_model=False, extra_callbacks=(), task=None):
    """Train (or resume) the run `cfg.run_dir`; returns its final state dict (and the model if asked).
    `extra_callbacks`: Keras callbacks added to the run's own (bench/bench_fit.py times the loop with one).
    `task`: what to train (default `ClassificationTask()`; localisation.LocalisationTask for box regression)."""
    task = task or ClassificationTask()
    print(cpu_line())  # every figure of a run can be traced to its machine
    policy = set_precision(cfg.mixed_precision)
    strategy = distribution_strategy()
    check_arguments(cfg, strategy.num_replicas_in_sync)
    source = vdata.load_source(cfg.data, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir,
                               val_fraction=cfg.val_fraction, seed=cfg.seed, layout=cfg.layout,
                               val_labels=cfg.val_labels)
    stats = ColorStats.from_json(cfg.stats) if cfg.stats else IMAGENET_STATS
    num_classes = len(source.class_names)
    resolved = {**dataclasses.asdict(cfg), "scale": list(cfg.scale), "num_classes": num_classes,
                "val_q": cfg.val_q, "precision_policy": policy, "replicas": strategy.num_replicas_in_sync}
    run_dir = RunDirectory(cfg.run_dir, is_chief(strategy))
    # Across workers, the chief's run directory decides (the others need not see it): its checks, its state
    state = on_chief(strategy, lambda: run_dir.prepare(resolved, source.class_names, stats))

    schedule = PlateauSchedule(monitor=task.monitor, patience=cfg.plateau_patience,
                               max_reductions=cfg.max_lr_reductions)
    with strategy.scope():
        model = task.build(cfg, num_classes)
        model.optimizer.build(model.trainable_variables)
    # Outside the scope: what only the chief does (load a checkpoint or a source run) must create no variable of
    # the strategy, since each is a collective that the other workers would not join.
    if state:
        if run_dir.is_chief:
            run_dir.restore_epoch(model, state)
        model.optimizer.learning_rate.assign(state["lr"])
        schedule.restore(state["schedule"])
        print(f"Resuming {cfg.run_dir} after epoch {state['epoch']} (lr {state['lr']:.3g})")
    elif run_dir.is_chief:
        copied = task.start_weights(model, cfg, num_classes)
        if copied:
            source_run = getattr(cfg, "from_run", None) or cfg.init_from or cfg.finetune_from
            print(f"Initialised {len(copied)} layers from {source_run}: {', '.join(copied)}")
    sync_from_chief(strategy, model)  # the chief's weights and optimizer state on every worker
    fix_keras_for_multi_worker(model, strategy)
    checkpoint = EpochCheckpoint(run_dir, schedule, list(state["history"]) if state else [],
                                 state["best_top1"] if state else -1.0, task.monitor)
    checkpoint.set_model(model)  # fit sets it too; a resumed run with no epoch left to train only reads it
    input_log = InputShareLog()
    callbacks = [schedule, checkpoint, keras.callbacks.TerminateOnNaN(), OneEpochPerFit(), input_log,
                 *extra_callbacks]
    if run_dir.is_chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=run_dir.file("tensorboard"), write_graph=False))

    val_data, val_steps = epoch_of(
        strategy, lambda context, batch: task.val_dataset(WorkerShare(source, context), batch, cfg, stats),
        task.num_examples(source, "val"), cfg.batch_size)
    first_epoch = state["epoch"] if state else 0
    last_epoch = cfg.epochs
    if schedule.ended_on_plateau:  # killed between the plateau's stop and finish(): only finish
        print(f"{cfg.run_dir} ended on its plateau after epoch {first_epoch}: finishing it")
        last_epoch = first_epoch
    for epoch in range(first_epoch, last_epoch):
        # each epoch its own shuffle, augmentation and dropout seed: a resumed run draws what the uninterrupted one
        # would have
        def train_pipeline(context, batch, epoch_seed=cfg.seed * 100_003 + epoch):
            share = input_log.share(source, context, shuffle_seed=epoch_seed)
            return task.train_dataset(share, batch, cfg, stats, augmentation_seed(epoch_seed, share))

        seed_dropout(model, cfg.seed * 100_003 + epoch)
        train_data, train_steps = epoch_of(strategy, train_pipeline, task.num_examples(source, "train"),
                                           cfg.batch_size)
        with worker_failures(strategy, lambda: len(checkpoint.history) and checkpoint.history[-1]["epoch"]):
            model.fit(train_data, steps_per_epoch=train_steps, validation_data=val_data,
                      validation_steps=val_steps, initial_epoch=epoch, epochs=cfg.epochs, callbacks=callbacks,
                      verbose="auto")
        if checkpoint.nan_epoch:
            raise FloatingPointError(
                f"the loss became NaN in epoch {checkpoint.nan_epoch}; training stopped. The last good checkpoint "
                f"({run_dir.checkpoints}) is kept: resume with a lower --lr or check the data")
        if schedule.ended_on_plateau:
            break
    epochs_done = checkpoint.history[-1]["epoch"] if checkpoint.history else first_epoch
    final = {**checkpoint.state(epochs_done), "ended_on_plateau": schedule.ended_on_plateau}
    run_dir.finish(final)
    return (model, final) if return_model else final
