"""Localisation (the paper's Appendix A, PAPER.md section 5): box-regression nets, their training and their testing.

The nets (`build_localisation_model`): a configuration of Table 1 whose last FC layer (`predictions`, linear) predicts
boxes instead of class scores: 4 numbers for single-class regression (SCR), 4 x classes for per-class regression
(PCR, class c's box in outputs 4c..4c+3). Every layer keeps its name, so `model.fully_convolutional` turns it into
the dense net unchanged. A box is (centre x, centre y, width, height) in units of the input crop (boxes.py).

Training (`train_localisation`, `vgg-keras train-localisation`) is `train.train` with a `LocalisationTask`: the
run directory, resume, plateau schedule (on validation mean IoU), progress bar and history.png are classification's.
Initialised from a classification run of the same configuration (all layers but `predictions`, which starts random),
learning rate 1e-3, Euclidean loss (half the squared distance of the 4 box parameters; PCR counts only the
ground-truth class's four outputs), all layers fine-tuned or only fc1 and fc2 (`--fine-tune fc`).

Testing (`run_localisation_eval`, `vgg-keras eval-localisation`), the paper's two protocols:
    center   the centre crop at each test scale Q (default: the middle of the training scales); the boxes of the
             scales and --models are averaged per class
    dense    the net applied densely (`evaluate.dense_maps`) to the whole image and its mirror at each Q: every
             location of the output map predicts a box in its own crop x crop window (offset 32 pixels per
             location: VGG's five poolings); the boxes of all locations, scales, mirrors and --models are merged
             greedily (`boxes.merge_boxes`: repeatedly average the two boxes of highest IoU while it is at least
             --merge-iou), and the class's box is the merged box of largest support
The classification net (`--classifier RUN`, dense evaluation at its test scales) gives the five guesses, each with
its box. Errors: GT-class (the box of the ground-truth class has IoU < 0.5 with every ground-truth box), and
ILSVRC's top-1 / top-5 localisation error (no guess among the first k with the right class *and* IoU >= 0.5 with a
ground-truth box of that class).
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from . import boxes as vboxes
from . import data as vdata
from .data.decode import OK, SKIPPED, bad_file_reason
from .data.images import decode_rgb
from .data.pipeline import center_window, element_seeds, eval_transform, stateless_seed, train_transform
from .evaluate import (DEFAULT_MAX_PIXELS, ModelScorer, bounded_view, check_max_pixels, dense_maps, dense_scores,
                       test_scales)
from .model import build_vgg, conv_layers, fully_convolutional, initialize_from
from .report import format_test_scales, format_train_scale, report_paths
from .runs import load_run, save_figure, write_json_atomic, write_text_atomic
from .train import TrainConfig, train, validation_scale

REGRESSIONS = {"per-class": "PCR", "single-class": "SCR"}
FINE_TUNE = ("all", "fc")
STRIDE = 32  # pixels between neighbouring locations of the dense output map: five 2x2 poolings


@dataclasses.dataclass
class LocalisationConfig(TrainConfig):
    """`TrainConfig` plus the localisation choices; the paper's lr 1e-3. scale, crop, config, data, batch size and
    the initialisation are taken from the classification run (`from_run`) where left at None / 0."""

    from_run: str = ""
    boxes: str = ""
    scale: tuple | None = None
    crop: int = 0
    batch_size: int = 0
    regression: str = "per-class"
    fine_tune: str = "all"
    lr: float = 1e-3
    merge_iou: float = vboxes.MERGE_IOU  # recorded for evaluation's default


# ---------------------------------------------------------------------------------------------------------
# The nets and their loss


def box_outputs(regression, num_classes):
    check_regression(regression)
    return 4 * num_classes if regression == "per-class" else 4


def check_regression(regression):
    if regression not in REGRESSIONS:
        raise ValueError(f"--regression {regression!r}: expected one of {', '.join(REGRESSIONS)}")


def class_boxes(y_pred, labels, num_classes):
    """The (cx, cy, w, h) [b, 4] of class `labels` [b] (int) from the net's outputs [b, 4] (SCR) or
    [b, 4 * num_classes] (PCR). keras.ops only."""
    if y_pred.shape[-1] == 4:
        return y_pred
    per_class = keras.ops.reshape(y_pred, (-1, num_classes, 4))
    index = keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1, 1, 1))
    return keras.ops.take_along_axis(per_class, keras.ops.repeat(index, 4, axis=2), axis=1)[:, 0]


@keras.saving.register_keras_serializable(package="vgg_keras")
class BoxLoss(keras.losses.Loss):
    """Euclidean loss of Caffe (half the squared distance) between the predicted box of the ground-truth class and
    the target. y_true [b, 5] = (label, cx, cy, w, h); y_pred [b, 4] or [b, 4 * num_classes]: a PCR net's other
    classes' outputs get no gradient."""

    def __init__(self, num_classes, name="box_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)

    def call(self, y_true, y_pred):
        predicted = class_boxes(keras.ops.cast(y_pred, "float32"), y_true[:, 0], self.num_classes)
        return 0.5 * keras.ops.sum(keras.ops.square(predicted - y_true[:, 1:5]), axis=-1)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def box_iou_metric(num_classes):
    """Mean IoU (crop frame) of the ground-truth class's predicted box with the target box, as a Keras metric."""
    def iou(y_true, y_pred):
        predicted = class_boxes(tf.cast(y_pred, tf.float32), y_true[:, 0], num_classes)
        return vboxes.tf_iou(vboxes.from_center_size(predicted, 1.0), vboxes.from_center_size(y_true[:, 1:5], 1.0))
    return iou


def build_localisation_model(cfg, num_classes):
    """The box-regression net of `cfg` (a LocalisationConfig), compiled: SGD with momentum at cfg.lr, BoxLoss, IoU.
    With fine_tune "fc" the conv layers are frozen (only fc1, fc2 and predictions train)."""
    if cfg.fine_tune not in FINE_TUNE:
        raise ValueError(f"--fine-tune {cfg.fine_tune!r}: expected 'all' or 'fc'")
    model = build_vgg(cfg.config, num_classes=box_outputs(cfg.regression, num_classes),
                      input_shape=(cfg.crop, cfg.crop, 3), dropout=cfg.dropout, weight_decay=cfg.weight_decay,
                      init=cfg.init, init_std=cfg.init_std, seed=cfg.seed, classifier_activation=None,
                      name=f"vgg_{cfg.config.lower().replace('-', '_')}_{REGRESSIONS[cfg.regression].lower()}")
    if cfg.fine_tune == "fc":
        for layer in conv_layers(model):
            layer.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum),
                  loss=BoxLoss(num_classes), metrics=[box_iou_metric(num_classes)], jit_compile=cfg.xla)
    return model


# ---------------------------------------------------------------------------------------------------------
# Data: records with their boxes


def box_lookup(box_set):
    """A graph function record id (string) -> row (int32) of `box_set.padded()`, -1 without boxes: the longest
    trailing part of the id's path (extension removed) that is a key, as `BoxSet.find`."""
    keys = list(box_set.images)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys, tf.string), tf.range(len(keys), dtype=tf.int32)), -1)
    depth = box_set.key_depth()

    def row(file_id):
        stem = tf.strings.regex_replace(tf.strings.regex_replace(file_id, r"\\", "/"), r"\.[^./]*$", "")
        parts = tf.strings.split(stem, "/")
        found = tf.constant(-1, tf.int32)
        for d in range(depth, 0, -1):
            found = tf.where(found >= 0, found, table.lookup(tf.strings.reduce_join(parts[-d:], separator="/")))
        return found
    return row


class BoxedRecords:
    """The records of a source that have ground-truth boxes, each with (labels [m], boxes [m, 4], frame [2])."""

    def __init__(self, source, box_set):
        self.source, self.box_set = source, box_set
        _, labels, boxes, frames = box_set.padded()
        self._labels, self._boxes, self._frames = (tf.constant(labels), tf.constant(boxes), tf.constant(frames))
        self._row = box_lookup(box_set)
        self._counts = {}

    def records(self, split, shuffle=False, seed=None):
        """{"image", "label", "id", "box_labels", "boxes", "frame"} of the split's images with boxes."""
        def attach(record):
            row = self._row(record["id"])
            safe = tf.maximum(row, 0)
            return {**record, "row": row, "box_labels": self._labels[safe], "boxes": self._boxes[safe],
                    "frame": self._frames[safe]}
        return (self.source.records(split, shuffle=shuffle, seed=seed).map(attach, num_parallel_calls=tf.data.AUTOTUNE)
                .filter(lambda record: record["row"] >= 0))

    def num_examples(self, split):
        """Images of `split` with boxes (counted once, by reading the ids)."""
        if split not in self._counts:
            rows = self.source.records(split).map(lambda record: self._row(record["id"]))
            self._counts[split] = int(rows.reduce(0, lambda n, row: n + tf.cast(row >= 0, tf.int32)))
            if not self._counts[split]:
                raise ValueError(f"--boxes {self.box_set.path}: none of its {len(self.box_set)} images is in the "
                                 f"{split} split of --data {self.source.spec}")
        return self._counts[split]


def _batches(records, fn, batch_size):
    """(pixels, target, weight) batches from fn(record) over the records that pass the bytes check."""
    records = records.filter(lambda record, *_: tf.equal(bad_file_reason(record["image"]), OK))
    return (records.map(fn, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


class LocalisationTask:
    """What `train.train` needs to train a box-regression net (see train.ClassificationTask)."""

    monitor = "val_iou"

    def __init__(self, cfg):
        self.cfg, self._boxed = cfg, None

    def boxed(self, source):
        if self._boxed is None:
            box_set = vboxes.load_boxes(self.cfg.boxes, source.class_names)
            print(f"Boxes: {len(box_set)} images from {self.cfg.boxes} ({box_set.counts})")
            self._boxed = BoxedRecords(source, box_set)
        return self._boxed

    def build(self, cfg, num_classes):
        return build_localisation_model(cfg, num_classes)

    def start_weights(self, model, cfg, num_classes):
        """Every layer but `predictions` from the classification run (which `prepare_config` checked)."""
        source = load_run(cfg.from_run).model
        names = [layer.name for layer in model.layers if layer.weights and layer.name != "predictions"]
        return initialize_from(model, source, layer_names=names)

    def num_examples(self, source, split):
        """Images of `split` with boxes, over all workers."""
        return self.boxed(source).num_examples(split)

    def train_dataset(self, share, batch, cfg, stats, seed):
        """One worker's epoch (`share`: its distribute.WorkerShare) of (pixels, box target, weight) batches."""
        boxed = BoxedRecords(share, self.boxed(share.source).box_set)
        scale = tuple(cfg.scale)

        def example(record, element_seed):
            seed_pair = stateless_seed(element_seed)
            pixels = train_transform(record["image"], seed_pair, scale, cfg.crop, stats)
            target, weight = vboxes.train_box_target(record["image"], seed_pair, record["boxes"],
                                                     record["box_labels"], record["frame"], scale, cfg.crop)
            return pixels, target, weight
        records = tf.data.Dataset.zip(boxed.records("train", shuffle=True, seed=seed), element_seeds(seed))
        return _batches(records, example, batch)

    def val_dataset(self, share, batch, cfg, stats):
        boxed = BoxedRecords(share, self.boxed(share.source).box_set)

        def example(record):
            target, weight = vboxes.center_box_target(record["image"], record["boxes"], record["box_labels"],
                                                      record["frame"], cfg.val_q, cfg.crop)
            return eval_transform(record["image"], cfg.val_q, cfg.crop, stats), target, weight
        return _batches(boxed.records("val"), example, batch)


def prepare_config(cfg):
    """Fill what `cfg` leaves open from the classification run `cfg.from_run`, and refuse a run that does not fit."""
    if not cfg.from_run:
        raise ValueError("--from RUN is required: the classification run to initialise from (PAPER.md section 5)")
    check_regression(cfg.regression)
    if cfg.fine_tune not in FINE_TUNE:
        raise ValueError(f"--fine-tune {cfg.fine_tune!r}: expected 'all' or 'fc'")
    source = load_run(cfg.from_run)
    if not source.config:
        raise ValueError(f"--from {cfg.from_run}: a run directory is needed (its config and classes), not a file")
    if source.config.get("regression"):
        raise ValueError(f"--from {cfg.from_run} is a localisation run; initialise from a classification run")
    for key in ("config", "data", "data_dir", "manual_dir", "val_fraction", "stats", "init", "init_std",
                "dropout", "weight_decay"):
        if key in source.config and getattr(cfg, key) in (None, "", TrainConfig.__dataclass_fields__[key].default):
            setattr(cfg, key, source.config[key])
    cfg.scale = tuple(cfg.scale or source.scale)
    cfg.crop = cfg.crop or source.crop
    cfg.batch_size = cfg.batch_size or int(source.config.get("batch_size", 256))
    if cfg.config != source.config.get("config"):
        raise ValueError(f"--from {cfg.from_run} trained config {source.config.get('config')}, not {cfg.config}")
    if cfg.crop != source.crop:
        raise ValueError(f"--crop {cfg.crop}: {cfg.from_run} was trained on {source.crop}-pixel crops")
    if not cfg.boxes:
        guess = os.path.join(str(cfg.data), "annotations.json")
        if not os.path.exists(guess):
            raise ValueError(f"--boxes is required: {guess} does not exist")
        cfg.boxes = guess
    return cfg


def train_localisation(cfg):
    """`vgg-keras train-localisation`: train (or resume) the box-regression run `cfg.run_dir`; returns its final
    state (`train.train`'s; its best_top1 is the best validation mean IoU)."""
    return train(prepare_config(cfg), task=LocalisationTask(cfg))


# ---------------------------------------------------------------------------------------------------------
# Testing


@dataclasses.dataclass
class LocMember:
    """A localisation net of an evaluation: its run, nets and test scales."""

    run: object
    scales: tuple
    fc_fn: object = None
    dense_fn: object = None

    @property
    def num_classes(self):
        return len(self.run.class_names)

    @property
    def regression(self):
        return self.run.config.get("regression") or ("single-class" if self.run.model.output_shape[-1] == 4
                                                     else "per-class")


def load_members(paths, protocol, scales=None):
    members = []
    for path in paths:
        run = load_run(path)
        outputs = run.model.output_shape[-1]
        if outputs not in (4, 4 * len(run.class_names)):
            raise ValueError(f"--model {path}: {outputs} outputs; a localisation net has 4 or 4 x classes")
        if members and run.class_names != members[0].run.class_names:
            raise ValueError(f"--model {path}: its classes are not those of {members[0].run.path}")
        if scales is None and run.scale is None:
            raise ValueError(f"--model {path}: no training scale recorded; pass --scales")
        default = ((validation_scale(run.scale, run.crop),) if protocol == "center" else test_scales(run.scale)) \
            if scales is None else tuple(scales)
        model = run.model
        members.append(LocMember(
            run, default,
            fc_fn=tf.function(lambda x, model=model: model(x, training=False),
                              input_signature=[tf.TensorSpec([None, run.crop, run.crop, 3], tf.float32)]),
            dense_fn=tf.function(fully_convolutional(model),
                                 input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])))
    return members


def center_boxes(member, data, label):
    """Boxes [scales, 4] (image pixels) of class `label` from the centre crop at each of the member's scales."""
    shape = vboxes.image_shape(data)
    out = []
    for q in member.scales:
        q = max(int(q), member.run.crop)
        crop = eval_transform(data, q, member.run.crop, member.run.stats)[None]
        params = class_boxes(member.fc_fn(crop), [label], member.num_classes)[0]
        box = vboxes.from_center_size(params, member.run.crop)
        out.append(vboxes.crop_to_window(box, center_window(q, member.run.crop)(shape), member.run.crop, False))
    return np.stack([b.numpy() for b in out])


def dense_boxes(net_fn, image, q, mean_rgb, crop, flip=True, max_pixels=DEFAULT_MAX_PIXELS):
    """The boxes of every location of the dense net at test scale Q, in the pixels of `image` (float32 [h, w, 3]):
    float32 [locations, outputs / 4, 4] (all mirrors' locations; PCR: one box per class, SCR: one).

    `evaluate.dense_maps` applies net_fn (`fully_convolutional` of a localisation net) to the image rescaled to
    max(Q, crop) and its mirror, within `max_pixels` per view: `evaluate.bounded_view` says what it saw, the image
    rescaled to `size` (a smaller Q for a large image) and, for a banner, only the window [top, left, h, w] of it.
    Location (i, j) of the map saw the crop x crop patch at (32 i, 32 j) of that window (five 2x2 poolings), so its
    box, predicted in that patch, is offset by (32 j, 32 i); a box of the mirror's map is mirrored back within the
    window's width; the window's (left, top) is added, then every box is scaled from `size` to the image's pixels.
    TensorFlow ops only: the serving graph (`LocaliseServing`) uses it too.
    """
    maps = tf.cast(dense_maps(net_fn, image, q, mean_rgb, crop, flip, max_pixels), tf.float32)  # [views, r, c, d]
    shape = tf.shape(image)
    _, size, window = bounded_view(shape[0], shape[1], q, crop, max_pixels)
    views, rows, cols = tf.shape(maps)[0], tf.shape(maps)[1], tf.shape(maps)[2]
    params = tf.reshape(maps, [views, rows, cols, -1, 4])
    boxes = vboxes.from_center_size(params, crop)  # in each location's patch
    x_off, y_off = tf.meshgrid(tf.range(cols) * STRIDE, tf.range(rows) * STRIDE)
    offsets = tf.cast(tf.stack([x_off, y_off, x_off, y_off], -1), tf.float32)[None, :, :, None, :]
    boxes = boxes + offsets  # in the window
    width = tf.cast(window[3], tf.float32)
    mirrored = tf.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], -1)
    boxes = tf.where(tf.reshape(tf.range(views) == 1, [-1, 1, 1, 1, 1]), mirrored, boxes)
    boxes = boxes + tf.cast(tf.stack([window[1], window[0]] * 2), tf.float32)  # in the rescaled image
    to_image = tf.cast(tf.stack([shape[1] / size[1], shape[0] / size[0]] * 2), tf.float32)
    return tf.reshape(boxes * to_image, [-1, tf.shape(params)[3], 4])


def dense_box_maps(member, image, flip=True, max_pixels=DEFAULT_MAX_PIXELS):
    """`dense_boxes` of a member at each of its scales: a list of numpy float32 [locations, outputs / 4, 4]."""
    return [dense_boxes(member.dense_fn, image, q, member.run.stats.mean_rgb, member.run.crop, flip,
                        max_pixels).numpy() for q in member.scales]


_merge_fn = tf.function(vboxes.best_merged_box,
                        input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([], tf.float32)])


def image_class_boxes(members, record, classes, protocol, flip=True, merge_iou=vboxes.MERGE_IOU,
                      max_pixels=DEFAULT_MAX_PIXELS):
    """{class: box [4] (image pixels)} for `classes`, from one record's bytes: center averages the members' centre
    boxes, dense merges all the members' dense boxes greedily (`boxes.best_merged_box`), each view within
    `max_pixels` pixels (`evaluate.bounded_view`)."""
    data = record["image"]
    result = {}
    if protocol == "center":
        for c in classes:
            result[c] = np.mean(np.concatenate([center_boxes(m, data, c) for m in members]), axis=0)
        return result
    image = decode_rgb(data)
    per_member = [np.concatenate(dense_box_maps(m, image, flip, max_pixels)) for m in members]  # [n, classes or 1, 4]
    for c in classes:
        pooled = np.concatenate([b[:, c if b.shape[1] > 1 else 0] for b in per_member])
        result[c] = _merge_fn(tf.constant(pooled, tf.float32), tf.constant(merge_iou, tf.float32)).numpy()
    return result


def localisation_errors(guesses, boxes, gt_labels, gt_boxes, ks=(1, 5)):
    """ILSVRC's localisation errors of one image: {k: 0 or 1}. guesses: class indices, best first; boxes: {class:
    box}; gt_labels [m], gt_boxes [m, 4]. A guess is right when its class is a ground-truth class and its box has
    IoU >= 0.5 with a ground-truth box of that class."""
    gt_labels, gt_boxes = np.asarray(gt_labels), np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    right = [c in gt_labels and np.max(vboxes.iou(boxes[c], gt_boxes[gt_labels == c])) >= 0.5 for c in guesses]
    return {k: 0 if any(right[:k]) else 1 for k in ks}


def run_localisation_eval(models, classifier=None, data=None, boxes=None, split="val", protocol="dense", scales=None,
                          flip=True, merge_iou=vboxes.MERGE_IOU, limit=None, out=None, predictions=None, figure=None,
                          progress=True, max_pixels=DEFAULT_MAX_PIXELS):
    """`vgg-keras eval-localisation`: the localisation errors of `models` (localisation runs; several pool their
    boxes) on `split` of `data` (default: what the first was trained on) with ground truth `boxes` (default: its
    training boxes). `classifier` (a classification run) gives the top-5 guesses; without it only the GT-class
    error is measured (the dense protocol needs it). `max_pixels` bounds every dense view (`--max-pixels`).
    Writes `out` (JSON) and its markdown table, per-image boxes to `predictions` (JSON lines), and a PNG of the
    first images with their boxes to `figure`. Returns the report."""
    if protocol not in ("center", "dense"):
        raise ValueError(f"--protocol {protocol!r}: expected center or dense")
    if protocol == "dense" and not classifier:
        raise ValueError("--protocol dense needs --classifier RUN: the classification net scores the merged boxes")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be a positive number of images")
    members = load_members(models, protocol, scales)
    first = members[0].run
    for member in members:
        check_max_pixels(max_pixels, member.run.crop)
    spec = data or first.config.get("data")
    source = vdata.load_source(spec, **{k: first.config[k] for k in ("data_dir", "manual_dir", "val_fraction", "seed")
                                        if first.config.get(k) is not None})
    if list(source.class_names) != list(first.class_names):
        raise ValueError(f"--data {spec}: its classes are not those {first.path} was trained on")
    box_set = vboxes.load_boxes(boxes or first.config.get("boxes"), source.class_names)
    scorer = None
    if classifier:
        cls_run = load_run(classifier)
        if list(cls_run.class_names) != list(first.class_names):
            raise ValueError(f"--classifier {classifier}: its classes are not those of {first.path}")
        scorer, cls_scales = ModelScorer.from_run(cls_run, max_pixels=max_pixels), test_scales(cls_run.scale)
    boxed = BoxedRecords(source, box_set)
    records, total = boxed.records(split), boxed.num_examples(split)
    if limit:
        records, total = records.take(limit), min(limit, total)
    every = max(1, total // FIGURE_IMAGES)  # the figure's images spread over the split (records come by class)
    rows, shown, start = [], [], time.perf_counter()
    for index, record in enumerate(tqdm(records, total=total, unit="img", disable=not progress,
                                        desc=f"localisation ({protocol})")):
        file_id = record["id"].numpy().decode("utf-8", "replace")
        if int(bad_file_reason(record["image"])) != OK:
            SKIPPED.add(file_id, "undecodable (see vgg-keras check-data)")
            continue
        label = int(record["label"])
        valid = record["box_labels"].numpy() >= 0
        gt_labels, gt_boxes = record["box_labels"].numpy()[valid], vboxes.to_image_frame(
            record["boxes"], record["frame"], vboxes.image_shape(record["image"])).numpy()[valid]
        guesses, scores = [], []
        if scorer is not None:
            posteriors = dense_scores(scorer, decode_rgb(record["image"]), cls_scales, flip)
            guesses = [int(c) for c in np.argsort(-posteriors, kind="stable")[:5]]
            scores = [float(posteriors[c]) for c in guesses]
        boxes_of = image_class_boxes(members, record, sorted({label, *guesses}), protocol, flip, merge_iou,
                                     max_pixels)
        gt_iou = float(np.max(vboxes.iou(boxes_of[label], gt_boxes[gt_labels == label]), initial=0.0))
        row = {"id": file_id, "label": label, "gt_iou": gt_iou, "guesses": guesses, "scores": scores,
               "boxes": {int(c): [round(float(v), 2) for v in b] for c, b in boxes_of.items()},
               "gt_boxes": gt_boxes.round(2).tolist(), "gt_labels": gt_labels.tolist()}
        if guesses:
            row["errors"] = localisation_errors(guesses, boxes_of, gt_labels, gt_boxes)
        rows.append(row)
        if figure and len(shown) < FIGURE_IMAGES and index % every == 0:
            shown.append((decode_rgb(record["image"]).numpy().astype(np.uint8), row))
    if not rows:
        raise ValueError(f"no image of the {split} split of {spec} has boxes in {box_set.path}")
    report = localisation_report(members, protocol, rows, merge_iou, flip, time.perf_counter() - start,
                                 classifier, spec, split, box_set, max_pixels)
    print(markdown_table(report))
    if out:
        json_path, markdown_path = report_paths(out)
        write_json_atomic(json_path, report)
        write_text_atomic(markdown_path, markdown_table(report))
        print(f"written to {json_path} and {markdown_path}")
    if predictions:
        write_text_atomic(predictions, "".join(json.dumps(row) + "\n" for row in rows))
    if figure:
        plot_boxes(shown, first.class_names, figure)
        print(f"boxes drawn in {figure}")
    return report


def localisation_report(members, protocol, rows, merge_iou, flip, seconds, classifier, spec, split, box_set,
                        max_pixels=DEFAULT_MAX_PIXELS):
    gt_error = 100.0 * np.mean([row["gt_iou"] < 0.5 for row in rows])
    with_guesses = [row for row in rows if "errors" in row]
    top = {k: round(100.0 * np.mean([row["errors"][k] for row in with_guesses]), 2) if with_guesses else None
           for k in (1, 5)}
    runs = [m.run for m in members]
    table_row = {
        "config": " + ".join(r.config.get("config", "?") for r in runs),
        "regression": " + ".join(REGRESSIONS[m.regression] for m in members),
        "fine_tuned": " + ".join({"all": "all", "fc": "1st and 2nd FC"}.get(r.config.get("fine_tune"), "?")
                                 for r in runs),
        "train_scale": " / ".join(format_train_scale(r.scale) for r in runs),
        "test_scales": " / ".join(format_test_scales(m.scales) for m in members),
        "protocol": protocol, "gt_class_error": round(gt_error, 2), "top1_error": top[1], "top5_error": top[5],
    }
    return {"protocol": protocol, "images": len(rows), "data": spec, "split": split, "boxes": box_set.path,
            "box_counts": box_set.counts, "classifier": classifier, "flip": flip, "merge_iou": merge_iou,
            "max_pixels": max_pixels,
            "mean_gt_iou": round(float(np.mean([row["gt_iou"] for row in rows])), 4),
            "gt_class_error": table_row["gt_class_error"], "top1_error": top[1], "top5_error": top[5],
            "wall_time_s": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 3) if seconds else None,
            "models": [str(r.path) for r in runs], "rows": [table_row]}


LOC_COLUMNS = (("config", "config"), ("regression", "regression"), ("fine_tuned", "fine-tuned layers"),
               ("train_scale", "train S"), ("test_scales", "test Q"), ("protocol", "protocol"),
               ("gt_class_error", "GT-class loc. err. (%)"), ("top1_error", "top-1 loc. err. (%)"),
               ("top5_error", "top-5 loc. err. (%)"))


def markdown_table(report):
    """The report as a markdown table shaped like the paper's Tables 8 (GT class) and 9 (top-5)."""
    lines = ["| " + " | ".join(title for _, title in LOC_COLUMNS) + " |",
             "|" + "---|" * 6 + "---:|---:|---:|"]
    for row in report["rows"]:
        cells = [("–" if row[key] is None else f"{row[key]:.2f}") if key.endswith("error") else str(row[key])
                 for key, _ in LOC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{report['images']} images of {report['data']} ({report['split']}) with boxes from "
                  f"{report['boxes']}; mean IoU of the GT-class box {report['mean_gt_iou']:.3f}; guesses from "
                  f"{report['classifier'] or '(no classifier)'}; flip: {'yes' if report['flip'] else 'no'}; merge "
                  f"IoU >= {report['merge_iou']}; {report['wall_time_s']:.1f} s"]
    return "\n".join(lines) + "\n"


FIGURE_IMAGES = 8


def plot_boxes(shown, class_names, path):
    """A PNG of images with their ground-truth boxes (green) and the top guess's box (red; the GT class's box
    when there are no guesses), titled with the guess, the true class and the box's best IoU with a ground-truth
    box (whatever the class: a right box under a wrong guess still counts as a top-1 error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, row) in zip(axes.ravel(), shown):
        ax.imshow(image)
        for box in row["gt_boxes"]:
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="lime", lw=2))
        guess = row["guesses"][0] if row["guesses"] else row["label"]
        box = row["boxes"][guess]
        ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="red", lw=2))
        overlap = float(np.max(vboxes.iou(box, row["gt_boxes"]), initial=0.0))
        ax.set_title(f"{class_names[guess]} (GT {class_names[row['label']]}), IoU {overlap:.2f}", fontsize=8,
                     color="black" if guess == row["label"] else "red")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Serving: the `localise` signature of `vgg-keras export --model RUN --localisation LOCRUN`

LOCALISE_SIGNATURE = "localise"


class LocaliseServing:
    """The `localise` serving function: image_bytes string [n] -> the classification net's top-k `classes` int32
    [n, k], `scores` (posteriors) float32 [n, k], `labels` string [n, k], and one box per class, `boxes` float32
    [n, k, 4] = [x0, y0, x1, y1] in the original image's pixels (the dense protocol: the localisation net's dense
    boxes at each test scale, merged greedily per class, the merged box of largest support).

    serving: export.DenseServing of the classification run (its posteriors, decode check and class names).
    """

    def __init__(self, serving, loc_run, scales, merge_iou=vboxes.MERGE_IOU):
        from .export import as_float32

        if len(loc_run.class_names) != serving.num_classes or (loc_run.config and list(loc_run.class_names)
                                                                != list(serving._class_names)):
            raise ValueError(f"--localisation {loc_run.path}: its classes are not the classification run's")
        self.serving, self.crop = serving, loc_run.crop
        self.dense_model = fully_convolutional(as_float32(loc_run.model))
        self.mean_rgb = [float(v) for v in loc_run.stats.mean_rgb]
        self.scales, self.merge_iou = [int(q) for q in scales], float(merge_iou)
        self.max_pixels = check_max_pixels(serving._max_pixels, self.crop)  # the classification export's bound

    def _one(self, image_bytes, index):
        from .export import checked_decode

        image = checked_decode(image_bytes, index)
        scores, classes = tf.math.top_k(self.serving._posteriors(image), k=self.serving.top_k)
        boxes = tf.concat([dense_boxes(self.dense_model, image, q, self.mean_rgb, self.crop,
                                       max_pixels=self.max_pixels) for q in self.scales], 0)  # [n, classes or 1, 4]
        columns = tf.where(tf.shape(boxes)[1] > 1, classes, tf.zeros_like(classes))
        per_class = tf.map_fn(lambda c: vboxes.best_merged_box(tf.gather(boxes, c, axis=1), self.merge_iou),
                              columns, fn_output_signature=tf.TensorSpec([4], tf.float32))
        return classes, scores, per_class

    def localise(self, image_bytes):
        k = self.serving.top_k
        classes, scores, boxes = tf.map_fn(
            lambda e: self._one(*e), (image_bytes, tf.range(tf.size(image_bytes))),
            fn_output_signature=(tf.TensorSpec([k], tf.int32), tf.TensorSpec([k], tf.float32),
                                 tf.TensorSpec([k, 4], tf.float32)))
        labels = tf.gather(tf.constant(self.serving._class_names), classes)
        return {"classes": classes, "scores": scores, "labels": labels, "boxes": boxes}

    def add_to(self, archive):
        """Track the localisation net and add the `localise` endpoint to a keras ExportArchive."""
        archive.track(self.dense_model)
        fn = tf.function(self.localise, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
                         jit_compile=False)
        fn.get_concrete_function()
        archive.add_endpoint(LOCALISE_SIGNATURE, fn)


def localise_extension(loc_path, merge_iou=vboxes.MERGE_IOU):
    """For `export.export(..., extend=...)`: a function (archive, serving, scales) that adds `localise`."""
    loc_run = load_run(loc_path)

    def extend(archive, serving, scales):
        LocaliseServing(serving, loc_run, scales, merge_iou).add_to(archive)
    return extend
