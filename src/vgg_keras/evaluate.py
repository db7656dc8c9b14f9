"""Evaluation of Section 3.2: centre crop, dense, multi-crop, multi-crop & dense, multi-scale and fusion.

One entry point, `evaluate(runs, records, method)`, built from per-image scorers:

    center           one centre crop per test scale Q, through the FC model
    dense            the fully-convolutional net over the whole image rescaled to Q; its class score map is
                     averaged spatially, then soft-maxed (the paper's order, the default; `softmax_first=True`
                     soft-maxes each location first, then averages the posteriors)
    multicrop        a 5x5 regular grid of crop x crop windows spanning the whole rescaled image at each Q
    multicrop+dense  the average of the two posteriors

With `flip` (the default, for every method) each view's horizontal mirror is averaged in. Posteriors are averaged
over views, then over scales (each scale has the same number of views, so it is one average), then over the models
of a fusion. An image is rescaled isotropically so that its smaller side is max(Q, crop): a test scale below the
crop is evaluated at the crop, the smallest input the FC layers accept. Crop methods resample only the parts of
the image under their crops (`rescaled_window`), so their cost does not grow with the image.

Dense evaluation's work per image is bounded: one view (the image or its mirror, as rescaled) has at most
`max_pixels` pixels (--max-pixels, default DEFAULT_MAX_PIXELS = 1024 x 1024). Above it the image is evaluated at
the largest Q that fits, and when not even Q = crop fits (a banner) on the central part of the image at Q = crop
(`bounded_view`); the report lists those images under "bounded". `dense_posteriors` is the one implementation,
also called by the exported SavedModel's graph (export.py).

Images of any size go through the networks one image (and its mirror) at a time, never padded, through
`tf.function`s traced once per model: the dense net's input signature is [None, None, None, 3], the crops'
[None, crop, crop, 3].

Errors: the rank of the true class is the number of *other* classes with a posterior at least as high; top-k
is an error when that rank is k or more. Ties therefore count against the model (a model that gives every class
the same score has 100% top-1 error, not 0%), and a NaN posterior is always an error.
"""

import contextlib
import dataclasses
import functools
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from .data import SKIPPED, decode_records, load_source
from .data.images import rescaled_size, subtract_mean
from .data.stats import IMAGENET_STATS
from .model import fully_convolutional, multiply_adds
from .report import PredictionWriter, evaluation_row, markdown_table, write_report
from .runs import Run, load_run

METHODS = ("center", "dense", "multicrop", "multicrop+dense")
GRID = 5
DEFAULT_MAX_PIXELS = 1 << 20  # pixels of rescaled image per dense view: see bounded_view and the README
CROP_BATCH = 25  # crops per network call: 25 crops of 224 px keep the activations of D under ~1 GB


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: unknown evaluation method; valid methods: {', '.join(METHODS)}")
    return method


def component_methods(method):
    """The methods whose posteriors `method` computes: its parts first, then itself."""
    check_method(method)
    return ("dense", "multicrop", method) if method == "multicrop+dense" else (method,)


def test_scales(train_scale):
    """The paper's test scales Q for a net trained at `train_scale`.

    A fixed S (an int, or a pair Smin == Smax) gives {S - 32, S, S + 32}; a jittered S in [Smin, Smax] gives
    {Smin, (Smin + Smax) / 2, Smax} (the middle rounded down).
    """
    smin, smax = (train_scale, train_scale) if np.isscalar(train_scale) else (int(s) for s in train_scale)
    if smin == smax:
        return (smin - 32, smin, smin + 32)
    return (smin, (smin + smax) // 2, smax)


test_scales.__test__ = False  # its name is the paper's; pytest must not collect it as a test


def grid_crop_boxes(height, width, crop, grid=GRID):
    """The grid x grid regular windows of a height x width image: an int array [grid * grid, 4] of
    (top, left, bottom, right), row by row.

    The outer windows touch the image's borders, the middle one (odd grid) is `center_crop`'s window, and the
    offsets are mirror-symmetric (the second half mirrors the first), so the grid of a flipped image is the
    flipped grid whenever (side - crop) is even.
    """
    if height < crop or width < crop:
        raise ValueError(f"a {height}x{width} image is smaller than the {crop}x{crop} crop")
    tops, lefts = _grid_offsets(height - crop, grid), _grid_offsets(width - crop, grid)
    return np.array([(t, left, t + crop, left + crop) for t in tops for left in lefts], dtype=np.int64)


def _grid_offsets(span, grid):
    first = [i * span // (grid - 1) if grid > 1 else span // 2 for i in range((grid + 1) // 2)]
    return first + [span - offset for offset in reversed(first[:grid // 2])]


class ModelScorer:
    """One model ready for evaluation: its preprocessing and its FC and dense nets as `tf.function`s with input
    signatures, so each is traced once whatever the image sizes (see `trace_counts`).

    Build one per model and reuse it for every image.
    """

    def __init__(self, model, crop=None, mean_rgb=IMAGENET_STATS.mean_rgb, softmax_first=False,
                 max_pixels=DEFAULT_MAX_PIXELS):
        self.model = model
        self.crop = int(crop or model.input_shape[1])
        self.mean_rgb = tuple(mean_rgb)
        self.softmax_first = softmax_first
        self.max_pixels = check_max_pixels(max_pixels, self.crop)
        self._fc_softmax = _fc_needs_softmax(model)
        self.crop_posteriors = tf.function(
            self._crop_posteriors, input_signature=[tf.TensorSpec([None, self.crop, self.crop, 3], tf.float32)])
        self._dense_functions = {}

    @classmethod
    def from_run(cls, run, softmax_first=False, max_pixels=DEFAULT_MAX_PIXELS):
        return cls(run.model, run.crop, run.stats.mean_rgb, softmax_first, max_pixels)

    @functools.cached_property
    def dense_model(self):
        """Built on first use: its FC-as-conv kernels are a copy (400 MB for D) that crop methods never need."""
        return fully_convolutional(self.model)

    def dense_function(self, flip=True):
        """(image float32 [h, w, 3], q int32 []) -> posteriors [classes]: `dense_posteriors` as one graph (rescale,
        mean, net and its mirror, softmax), any image size and Q, traced once per `flip`."""
        if flip not in self._dense_functions:
            dense_model = self.dense_model  # built here, eagerly: it reads the FC weights

            def posteriors(image, q):
                return dense_posteriors(dense_model, image, q, self.mean_rgb, self.crop, flip, self.softmax_first,
                                        self.max_pixels)

            self._dense_functions[flip] = tf.function(posteriors, input_signature=[
                tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([], tf.int32)])
        return self._dense_functions[flip]

    def _crop_posteriors(self, crops):
        outputs = self.model(crops, training=False)
        return tf.nn.softmax(outputs) if self._fc_softmax else outputs

    def crops(self, image, scale, boxes):
        """The crop x crop windows `boxes` [n, 4] (top, left, bottom, right) of `image` rescaled so its smaller side
        is max(scale, crop), mean subtracted: [n, crop, crop, 3]. Only the parts of the image under the crops are
        rescaled (`rescaled_window`): a banner's 25 crops cost no more than a photo's."""
        size = self.rescaled_size(image, scale)
        rows, cols = _covering(boxes[:, 0], self.crop), _covering(boxes[:, 1], self.crop)
        blocks, crops = {}, []
        for top, left, _, _ in boxes:
            row, col = _interval_of(rows, top), _interval_of(cols, left)
            if (row, col) not in blocks:
                (r0, r1), (c0, c1) = row, col
                blocks[row, col] = rescaled_window(image, size, [r0, c0, r1 - r0, c1 - c0])
            crops.append(blocks[row, col][top - row[0]:top - row[0] + self.crop,
                                          left - col[0]:left - col[0] + self.crop])
        return subtract_mean(tf.stack(crops), self.mean_rgb)

    def rescaled_size(self, image, scale):
        """[h, w] (ints) of `image` rescaled so that its smaller side is max(scale, crop)."""
        return [int(v) for v in rescaled_size(image.shape[0], image.shape[1], max(int(scale), self.crop))]

    def trace_counts(self):
        """{"crop": n, "dense": n}: how often each network function has been traced (0 or 1 when all is well)."""
        return {"crop": self.crop_posteriors.experimental_get_tracing_count(),
                "dense": sum(fn.experimental_get_tracing_count() for fn in self._dense_functions.values())}


def _covering(starts, length):
    """The merged intervals [(first, end)] covering [start, start + length) for every start (one axis)."""
    intervals = []
    for start in sorted(set(int(v) for v in starts)):
        if intervals and start <= intervals[-1][1]:
            intervals[-1] = (intervals[-1][0], start + length)
        else:
            intervals.append((start, start + length))
    return intervals


def _interval_of(intervals, start):
    return next(interval for interval in intervals if interval[0] <= start < interval[1])


def _fc_needs_softmax(model):
    """Whether the FC model's output is scores (a linear `predictions` layer) rather than posteriors."""
    activation = getattr(model.layers[-1], "activation", None)
    if activation is keras.activations.softmax:
        return False
    if activation is keras.activations.linear:
        return True
    raise ValueError(f"model {model.name!r}: its last layer's activation is {activation!r}; "
                     "evaluation needs softmax posteriors or linear class scores")


def _with_mirrors(batch, flip):
    """`batch` [n, h, w, 3] followed by its horizontal mirrors: one network call for both."""
    return tf.concat([batch, tf.reverse(batch, axis=[2])], axis=0) if flip else batch


def _mean_posteriors(posterior_fn, views, batch_size):
    """Mean posteriors [classes] of `views` [n, h, w, 3], run through `posterior_fn` in chunks of batch_size."""
    chunks = [posterior_fn(views[i:i + batch_size]) for i in range(0, int(views.shape[0]), batch_size)]
    return tf.reduce_mean(tf.concat(chunks, axis=0), axis=0).numpy()


def center_box(height, width, crop):
    """[1, 4] (top, left, bottom, right): the central crop x crop window of a height x width image
    (`images.center_crop`'s)."""
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.array([[top, left, top + crop, left + crop]], dtype=np.int64)


def center_scores(scorer, image, scales, flip=True):
    """Posteriors [classes] from one centre crop (and its mirror) at each scale, averaged."""
    crops = tf.concat([scorer.crops(image, q, center_box(*scorer.rescaled_size(image, q), scorer.crop))
                       for q in scales], axis=0)
    return _mean_posteriors(scorer.crop_posteriors, _with_mirrors(crops, flip), len(scales) * 2)


def bounded_view(height, width, q, crop, max_pixels=DEFAULT_MAX_PIXELS):
    """What dense evaluation of a height x width image at test scale `q` runs the net on, within the bound of
    `max_pixels` pixels of rescaled image per view (graph-safe: int or int32 tensors in, int32 tensors out).

    Returns (side, size, window):
        side    the smaller side of the rescaled image: max(q, crop) when the rescaled image has at most max_pixels
                pixels; above that the largest side >= crop that keeps it within max_pixels (the largest Q that fits)
        size    [h, w] of the image rescaled isotropically to smaller side `side` (`rescaled_size`)
        window  [top, left, h, w] of that rescaled image the net sees: all of it, unless even side = crop exceeds
                max_pixels (an aspect ratio above max_pixels / crop**2, a banner); then its central part, the long
                side cut to max_pixels // crop pixels
    So the net's input never exceeds max_pixels pixels (and its mirror as many). Raises ValueError when
    max_pixels < crop**2 (not even one crop fits).
    """
    check_max_pixels(max_pixels, crop)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    aspect = tf.maximum(h, w) / tf.minimum(h, w)
    # The largest side s with s * (aspect * s + 1/2) <= max_pixels fits (rounding the long side adds at most half a
    # pixel); the largest that fits is that one or the next (the long side may round down).
    limit = tf.cast(max_pixels, tf.float64)
    fits = tf.floor((tf.sqrt(0.25 + 4.0 * aspect * limit) - 0.5) / (2.0 * aspect))
    next_size = rescaled_size(height, width, tf.cast(fits, tf.int32) + 1)
    fits += tf.cast(tf.cast(next_size[0], tf.int64) * tf.cast(next_size[1], tf.int64) <= int(max_pixels), tf.float64)
    wanted = tf.maximum(tf.cast(q, tf.float64), float(crop))
    side = tf.cast(tf.maximum(tf.minimum(wanted, fits), float(crop)), tf.int32)
    size = tf.stack(rescaled_size(height, width, side))
    too_many = tf.reduce_prod(tf.cast(size, tf.int64)) > int(max_pixels)  # int64: a banner's area overflows int32
    seen = tf.where(too_many, tf.minimum(size, int(max_pixels) // int(crop)), size)
    return side, size, tf.concat([(size - seen) // 2, seen], axis=0)


def check_max_pixels(max_pixels, crop):
    if int(max_pixels) < int(crop) ** 2:
        raise ValueError(f"--max-pixels {max_pixels}: below one {crop}x{crop} crop ({int(crop) ** 2} pixels)")
    return int(max_pixels)


def bound_note(height, width, q, crop, max_pixels=DEFAULT_MAX_PIXELS):
    """None when dense evaluation sees the whole height x width image at max(q, crop), else a line saying what
    `bounded_view` evaluates instead (for the report)."""
    side, size, window = (np.asarray(v) for v in bounded_view(height, width, q, crop, max_pixels))
    wanted = max(int(q), int(crop))
    if side == wanted:
        return None
    full = [int(v) for v in rescaled_size(height, width, wanted)]
    note = (f"{height}x{width} at Q={q}: {full[0]}x{full[1]} = {full[0] * full[1]} pixels > --max-pixels "
            f"{max_pixels}; evaluated at Q={side} ({size[0]}x{size[1]})")
    if (window[2:] != size).any():
        note += f", its central {window[2]}x{window[3]}"
    return note


def rescaled_window(image, size, window):
    """The `window` [top, left, h, w] of `image` [H, W, 3] rescaled to `size` [h, w] (float32; graph-safe),
    resampled from only the original pixels under it.

    Equal (within float rounding of the sample positions, ~1e-3 of a 0-255 level) to slicing `images.rescale`'s
    output, which is the same antialiased bilinear resampling (ScaleAndTranslate, triangle kernel) of the whole
    image: the kernel's support at this scale (max(1, 1 / scale) original pixels around each sample, renormalised
    at the image border) decides the original pixels needed. A window covering the whole image is exactly
    `images.rescale`.
    """
    shape = tf.shape(image)[:2]
    scale = tf.cast(size, tf.float32) / tf.cast(shape, tf.float32)
    window = tf.cast(window, tf.int32)
    start, extent = window[:2], window[2:]
    support = tf.maximum(1.0 / scale, 1.0) + 1.0  # kernel radius in original pixels, and one for rounding
    first = tf.clip_by_value(tf.cast(tf.floor(tf.cast(start, tf.float32) / scale - support), tf.int32), 0, shape)
    last = tf.clip_by_value(tf.cast(tf.math.ceil(tf.cast(start + extent, tf.float32) / scale + support), tf.int32),
                            first, shape)
    part = tf.slice(image, tf.concat([first, [0]], 0), tf.concat([last - first, [3]], 0))
    translation = tf.cast(first, tf.float32) * scale - tf.cast(start, tf.float32)
    resampled = tf.raw_ops.ScaleAndTranslate(images=tf.cast(part, tf.float32)[None], size=extent, scale=scale,
                                             translation=translation, kernel_type="triangle", antialias=True)[0]
    resampled.set_shape([None, None, 3])
    return resampled


def dense_maps(net_fn, image, q, mean_rgb, crop, flip=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Dense application (PAPER.md section 3.2) of a fully-convolutional net to one image: the one path every dense
    use goes through (classification in `vgg-keras eval` and in the exported SavedModel, localisation boxes,
    transfer features). Graph-safe: `q` may be an int32 tensor and the image of any size.

    image: float32 [h, w, 3], RGB 0-255, any size; it is rescaled isotropically so that its smaller side is
    max(q, crop) pixels and mean-subtracted (`mean_rgb`, 3 floats, 0-255), then run through `net_fn` (a callable on
    float32 [n, H, W, 3], e.g. `fully_convolutional(model)` or a tf.function of it) together with its horizontal
    mirror, in one unpadded call. Returns net_fn's output maps [2, h', w', d] ([1, ...] without flip; the mirror's
    map is left mirrored).

    The work is bounded: the net's input never exceeds `max_pixels` pixels per view (see `bounded_view` for what
    is evaluated above it: the largest Q that fits, and for extreme aspect ratios the central part at Q = crop), and
    only that part of the image is resampled. Use `bounded_view` to map output positions back to the image.
    """
    shape = tf.shape(image)
    _, size, window = bounded_view(shape[0], shape[1], q, crop, max_pixels)
    x = subtract_mean(rescaled_window(image, size, window), mean_rgb)[None]
    return net_fn(_with_mirrors(x, flip))


def dense_posteriors(net_fn, image, q, mean_rgb, crop, flip=True, softmax_first=False,
                     max_pixels=DEFAULT_MAX_PIXELS):
    """Dense evaluation of one image at one test scale (PAPER.md section 3.2), graph-safe: the class score maps
    of `dense_maps` (net_fn: the fully-convolutional net's pre-softmax scores) averaged spatially, then soft-maxed
    (the paper's order; `softmax_first`: soft-max each location, then average), then averaged over the image and
    its mirror. Returns float32 posteriors [classes]. `vgg-keras eval` and the exported SavedModel both call this."""
    score_maps = tf.cast(dense_maps(net_fn, image, q, mean_rgb, crop, flip, max_pixels), tf.float32)
    if softmax_first:
        posteriors = tf.reduce_mean(tf.nn.softmax(score_maps), axis=[1, 2])
    else:
        posteriors = tf.nn.softmax(tf.reduce_mean(score_maps, axis=[1, 2]))
    return tf.reduce_mean(posteriors, axis=0)


def dense_scores(scorer, image, scales, flip=True):
    """Dense evaluation: posteriors [classes] of the whole image at each scale (the image and its mirror in one
    call, unpadded, within the scorer's max_pixels), averaged over mirrors and scales."""
    dense = scorer.dense_function(flip)
    return np.mean([dense(image, tf.constant(int(q), tf.int32)).numpy() for q in scales], axis=0)


def multi_crop_scores(scorer, image, scales, flip=True, grid=GRID, batch_size=CROP_BATCH):
    """Multi-crop evaluation: posteriors [classes] averaged over a grid x grid set of crops (and their mirrors)
    at each scale: 50 views per scale with the defaults, 150 over three scales."""
    crops = tf.concat([scorer.crops(image, q, grid_crop_boxes(*scorer.rescaled_size(image, q), scorer.crop, grid))
                       for q in scales], axis=0)
    return _mean_posteriors(scorer.crop_posteriors, _with_mirrors(crops, flip), batch_size)


def image_posteriors(scorer, image, method, scales, flip=True, grid=GRID, batch_size=CROP_BATCH):
    """{method: posteriors [classes]} for each of `component_methods(method)`, computing each part once."""
    posteriors = {}
    for name in component_methods(method):
        if name == "center":
            posteriors[name] = center_scores(scorer, image, scales, flip)
        elif name == "dense":
            posteriors[name] = dense_scores(scorer, image, scales, flip)
        elif name == "multicrop":
            posteriors[name] = multi_crop_scores(scorer, image, scales, flip, grid, batch_size)
        else:  # multicrop+dense
            posteriors[name] = (posteriors["dense"] + posteriors["multicrop"]) / 2
    return posteriors


def views_per_image(method, scales, flip=True, grid=GRID):
    """{"crops": n, "dense": n}: the crop-sized views and the whole-image (dense) views one image costs."""
    per_scale = len(scales) * (2 if flip else 1)
    parts = component_methods(method)
    crops = per_scale * (1 if "center" in parts else grid * grid if "multicrop" in parts else 0)
    return {"crops": crops, "dense": per_scale if "dense" in parts else 0}


def dense_multiply_adds(dense_model, height, width):
    """Multiply-adds of the dense net over one height x width input, counted from each layer's output shape
    (the FC-as-conv layers included)."""
    shape, total = (1, height, width, dense_model.input_shape[-1]), 0
    for layer in dense_model.layers[1:]:
        shape = layer.compute_output_shape(shape)
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            total += shape[1] * shape[2] * kh * kw * cin * cout
    return total


def method_multiply_adds(scorer, height, width, method, scales, flip=True, grid=GRID):
    """Multiply-adds of evaluating one height x width image with `method` at `scales` (dense: of the view
    `bounded_view` chooses within the scorer's max_pixels)."""
    views = views_per_image(method, scales, flip, grid)
    total = views["crops"] * multiply_adds(scorer.model)
    if views["dense"]:
        mirrors = 2 if flip else 1
        for q in scales:
            _, _, window = bounded_view(height, width, q, scorer.crop, scorer.max_pixels)
            total += mirrors * dense_multiply_adds(scorer.dense_model, int(window[2]), int(window[3]))
    return total


def true_class_rank(probs, labels):
    """The number of other classes scoring at least as high as the true class, per image (ties count against
    the model; a NaN posterior gets the worst rank)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    true = probs[np.arange(len(labels)), labels]
    ranks = np.sum(probs >= true[:, None], axis=1) - 1
    return np.where(np.isnan(true), probs.shape[1] - 1, ranks)


def top_k_errors(probs, labels, ks=(1, 5)):
    """{k: top-k error in %} of posteriors `probs` [n, classes] against `labels` [n] (see `true_class_rank`)."""
    return errors_from_ranks(true_class_rank(probs, labels), ks)


def errors_from_ranks(ranks, ks=(1, 5)):
    ranks = np.asarray(ranks)
    return {k: float(100.0 * np.mean(ranks >= k)) if len(ranks) else float("nan") for k in ks}


@dataclasses.dataclass
class Member:
    """A model of an evaluation: its run, its scorer and its test scales."""
    run: Run
    scorer: ModelScorer
    scales: tuple

    @property
    def config(self):
        return self.run.config.get("config") or self.run.model.name


def parse_scales(text):
    """'256,384,512' -> (256, 384, 512); anything but a non-empty list of positive integers is refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--scales {text!r}: expected comma-separated positive integers, e.g. 256,384,512")
    return tuple(int(p) for p in parts)


def check_fusable(runs):
    """Refuse to fuse models whose classes differ (posteriors of different classes cannot be averaged)."""
    first = runs[0]
    for run in runs[1:]:
        if len(run.class_names) != len(first.class_names):
            raise ValueError(f"cannot fuse {first.path} ({len(first.class_names)} classes) with "
                             f"{run.path} ({len(run.class_names)} classes)")
        if run.config and first.config and run.class_names != first.class_names:
            raise ValueError(f"cannot fuse {first.path} with {run.path}: same number of classes, different names")


def make_members(runs, scales=None, softmax_first=False, max_pixels=DEFAULT_MAX_PIXELS):
    """Load (paths) and check the models of an evaluation, each with `scales` or its own paper test scales."""
    runs = [run if isinstance(run, Run) else load_run(run) for run in runs]
    if not runs:
        raise ValueError("no model to evaluate: pass at least one --model")
    check_fusable(runs)
    members = []
    for run in runs:
        if scales is None and run.scale is None:
            raise ValueError(f"{run.path}: no training scale recorded (a bare model file); pass --scales")
        members.append(Member(run, ModelScorer.from_run(run, softmax_first, max_pixels),
                              tuple(scales) if scales is not None else test_scales(run.scale)))
    return members


def decoded_images(records):
    """The records with "image" decoded, in parallel ahead of the networks; undecodable files are skipped (and
    listed in `SKIPPED`)."""
    return decode_records(records).prefetch(2)


def evaluate(runs, records, method="dense", scales=None, flip=True, softmax_first=False, grid=GRID,
             batch_size=CROP_BATCH, progress=True, on_image=None, max_pixels=DEFAULT_MAX_PIXELS):
    """Evaluate one model, or the fusion of several, on `records` (a tf.data.Dataset of {"image", "label", "id"}).

    runs: Run objects or paths (run directories, .keras files). scales: the test scales of every model, or None
    for each model's paper scales (`test_scales` of its training scale). on_image(id, label, posteriors): called
    per image with the headline posteriors (the fusion's, or the one model's, for `method`). max_pixels: the bound
    on one dense view (`bounded_view`); the images it changed are evaluated and listed in the report's "bounded".
    Returns the report: the headline top-1 / top-5 errors, counts and timing, and one row per model and
    component method (and per method for the fusion), shaped like the paper's tables.
    """
    check_method(method)
    members = make_members(runs, scales, softmax_first, max_pixels)
    keys = [(i, m) for i in range(len(members)) for m in component_methods(method)]
    if len(members) > 1:
        keys += [("fusion", m) for m in component_methods(method)]
    ranks = {key: [] for key in keys}
    bounded = {}
    skipped_before = SKIPPED.reasons()
    start = time.perf_counter()
    total = int(records.cardinality()) if records.cardinality() >= 0 else None
    for record in tqdm(decoded_images(records), total=total, unit="img", disable=not progress):
        image, label = record["image"], int(record["label"])
        per_model = [image_posteriors(m.scorer, image, method, m.scales, flip, grid, batch_size) for m in members]
        posteriors = {(i, name): p for i, parts in enumerate(per_model) for name, p in parts.items()}
        if len(members) > 1:
            posteriors.update({("fusion", name): np.mean([parts[name] for parts in per_model], axis=0)
                               for name in component_methods(method)})
        if "dense" in component_methods(method):
            notes = {bound_note(*image.shape[:2], q, m.scorer.crop, max_pixels) for m in members for q in m.scales}
            if notes - {None}:
                bounded[record["id"].numpy().decode("utf-8", "replace")] = "; ".join(sorted(notes - {None}))
        for key in keys:
            ranks[key].append(int(true_class_rank(posteriors[key][None], [label])[0]))
        if on_image is not None:
            headline = ("fusion" if len(members) > 1 else 0, method)
            on_image(record["id"].numpy().decode("utf-8", "replace"), label, posteriors[headline])
    seconds = time.perf_counter() - start
    if not ranks[keys[0]]:
        raise ValueError("no image to evaluate: the records are empty or none could be decoded")
    skipped = {k: v for k, v in SKIPPED.reasons().items() if k not in skipped_before}
    report = _report(members, method, flip, softmax_first, grid, ranks, seconds, skipped)
    report.update(max_pixels=max_pixels, bounded=bounded)
    return report


def _report(members, method, flip, softmax_first, grid, ranks, seconds, skipped):
    rows = [evaluation_row(members if key[0] == "fusion" else [members[key[0]]], key[1], errors_from_ranks(r))
            for key, r in ranks.items()]
    headline = rows[-1]  # the fusion's (or the one model's) `method`: the last key of `evaluate`
    images = len(next(iter(ranks.values())))
    models = [{"path": str(m.run.path), "config": m.config,
               "train_scale": list(m.run.scale) if m.run.scale else None, "test_scales": list(m.scales),
               "crop": m.scorer.crop,
               "views_per_image": views_per_image(method, m.scales, flip, grid),
               "traces": m.scorer.trace_counts()} for m in members]
    return {
        "method": method, "flip": flip,
        "dense_order": "softmax, then spatial average" if softmax_first else "spatial average, then softmax",
        "images": images, "skipped": skipped,
        "top1_error": headline["top1_error"], "top5_error": headline["top5_error"],
        "crops_per_image": sum(m["views_per_image"]["crops"] for m in models),
        "dense_views_per_image": sum(m["views_per_image"]["dense"] for m in models),
        "wall_time_s": round(seconds, 3), "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "models": models, "rows": rows,
    }


# What training records beside "data" that selects the same examples again (a held-out split included).
RECORDED_DATA_OPTIONS = ("data_dir", "manual_dir", "val_fraction", "seed", "layout", "val_labels")


def load_eval_source(run, data=None):
    """(spec, source) of the data to evaluate on: `data`, or what `run` was trained on. The run's recorded
    data_dir / manual_dir / val_fraction / seed are passed along, so a held-out split is the one training held out."""
    spec = data or run.config.get("data")
    if not spec:
        raise ValueError(f"--data is needed: {run.path} records no training data (a bare model file)")
    options = {key: run.config[key] for key in RECORDED_DATA_OPTIONS if run.config.get(key) is not None}
    return spec, load_source(spec, **options)


def check_classes(runs, source, spec):
    """The class names to report with; refuses data whose classes are not the models' (labels would not match)."""
    for run in runs:
        if not run.config:  # a bare model file names its classes 0..n-1: only the count can be checked
            if len(run.class_names) != len(source.class_names):
                raise ValueError(f"--data {spec} has {len(source.class_names)} classes, "
                                 f"{run.path} has {len(run.class_names)}")
        elif list(run.class_names) != list(source.class_names):
            raise ValueError(f"--data {spec}: its {len(source.class_names)} classes are not those {run.path} was "
                             f"trained on ({len(run.class_names)} classes), or not in the same order")
    return list(source.class_names)


def run_evaluation(models, data=None, split="val", method="dense", scales=None, flip=True, out=None,
                   predictions=None, softmax_first=False, limit=None, progress=True, max_pixels=DEFAULT_MAX_PIXELS):
    """`vgg-keras eval`: evaluate `models` (run directories or .keras files; several are fused) on `split` of
    `data` (default: the first run's training data); print the paper-shaped table, write `out` (JSON) and its
    markdown beside it, and per-image top-5 to `predictions`. Dense views are bounded by `max_pixels` (--max-pixels,
    see `bounded_view`); the images above it are listed in the report. Returns the report."""
    check_method(method)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be a positive number of images")
    runs = [load_run(path) for path in models]
    check_fusable(runs)
    spec, source = load_eval_source(runs[0], data)
    class_names = check_classes(runs, source, spec)
    records = source.records(split)
    if limit:
        records = records.take(limit)
    with PredictionWriter(predictions, class_names) if predictions else contextlib.nullcontext() as on_image:
        report = evaluate(runs, records, method, scales, flip, softmax_first, progress=progress, on_image=on_image,
                          max_pixels=max_pixels)
    report.update(data=spec, split=split)
    print(markdown_table(report))
    if out:
        print("written to " + " and ".join(write_report(report, out)))
    return report
