"""The training transform of PAPER.md section 2 (scale jittering, random crop, flip, PCA colour shift, mean
subtraction), the validation transform (rescale to Q, centre crop), and the batched datasets built from a source.

Both transforms crop a window of the isotropically rescaled image. That window is a window of the original image
too, so it is computed in original pixels, decoded alone (`decode.decode_window`) and resized to crop x crop: the
whole image is never decoded (JPEG) nor rescaled, and a tiny or very elongated image costs no more than another.

Randomness is stateless: each element gets its own seed from `tf.data.Dataset.random(seed)`, from which all its
random choices are drawn (`training_choices`), so a given `seed` reproduces the stream exactly, and each new epoch
(each new iteration of the dataset) draws new numbers.
"""

import numbers

import tensorflow as tf

from .decode import checked_batches, decode_window
from .images import add_per_channel, subtract_mean
from .sources import check_split, expected_records, require_examples
from .stats import IMAGENET_STATS

AUTOTUNE = tf.data.AUTOTUNE


def parse_scale(text, flag="--scale"):
    """'256' -> (256, 256) (fixed S); '256:512' -> (256, 512) (S drawn uniformly per image)."""
    parts = str(text).split(":")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        smin, smax = int(parts[0]), int(parts[-1])
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected S (e.g. 256) or Smin:Smax (e.g. 256:512)") from None
    if smin < 1:
        raise ValueError(f"{flag} {text!r}: the scale must be a positive number of pixels")
    if smin > smax:
        raise ValueError(f"{flag} {text!r}: Smin ({smin}) is larger than Smax ({smax})")
    return smin, smax


def check_crop(scale, crop, scale_flag="--scale"):
    """Validate (Smin, Smax) and the crop size up front; returns (Smin, Smax) as ints."""
    if isinstance(scale, (int, str)):
        scale = parse_scale(scale, scale_flag)
    smin, smax = parse_scale(":".join(str(s) for s in scale), scale_flag)
    if not _is_positive_int(crop):
        raise ValueError(f"--crop {crop!r}: the crop size must be a positive number of pixels")
    crop = int(crop)
    if crop > smin:
        raise ValueError(f"--crop {crop} is larger than the smallest scale {smin} ({scale_flag}): "
                         "a crop must fit inside the rescaled image")
    return smin, smax


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_batch_size(batch_size):
    if not _is_positive_int(batch_size):
        raise ValueError(f"--batch-size {batch_size!r}: must be a positive integer")


def _rescaled(shape, smallest_side):
    """(ratio, new shape) of the isotropic rescale of an image of `shape` [h, w] that makes its smaller side
    `smallest_side` (as images.rescaled_size): ratio = rescaled pixels per original pixel, new shape int32 [2]."""
    shape = tf.cast(shape, tf.float32)
    ratio = tf.cast(smallest_side, tf.float32) / tf.reduce_min(shape)
    return ratio, tf.maximum(tf.cast(tf.round(shape * ratio), tf.int32), tf.cast(smallest_side, tf.int32))


def crop_window(shape, smallest_side, crop, offset):
    """The window [top, left, height, width] (int32) of an image of `shape` [h, w] that becomes the crop x crop crop
    at `offset` [top, left] of the image isotropically rescaled so that its smaller side is `smallest_side`."""
    ratio, _ = _rescaled(shape, smallest_side)
    return _window(shape, ratio, crop, offset)


def _window(shape, ratio, crop, offset):
    """crop_window for a known rescaling `ratio` (rescaled pixels per original pixel)."""
    size = tf.minimum(tf.maximum(tf.cast(tf.round(crop / ratio), tf.int32), 1), shape)  # [2]
    start = tf.clip_by_value(tf.cast(tf.round(tf.cast(offset, tf.float32) / ratio), tf.int32), 0, shape - size)
    return tf.concat([start, size], 0)


def random_window(smallest_side, crop, position):
    """window_fn(shape) for `decode_window`: the crop at `position` [2] (uniform in [0, 1)) of all the possible
    positions in the rescaled image."""
    def window_fn(shape):
        ratio, rescaled = _rescaled(shape, smallest_side)  # once per image: it runs on every training crop
        offset = tf.minimum(tf.cast(position * tf.cast(rescaled - crop + 1, tf.float32), tf.int32), rescaled - crop)
        return _window(shape, ratio, crop, offset)
    return window_fn


def center_window(smallest_side, crop):
    """window_fn(shape) for `decode_window`: the central crop of the rescaled image."""
    def window_fn(shape):
        ratio, rescaled = _rescaled(shape, smallest_side)
        return _window(shape, ratio, crop, (rescaled - crop) // 2)
    return window_fn


def pca_color_offset(alpha, stats):
    """Krizhevsky et al.'s colour shift sum_i alpha_i lambda_i p_i, in 0-255 units (the eigenvalues are in [0, 1]
    units)."""
    eigenvectors = tf.constant(stats.eigenvectors, tf.float32)  # columns are p_i
    return 255.0 * tf.linalg.matvec(eigenvectors, alpha * tf.constant(stats.eigenvalues, tf.float32))


def training_choices(seed, scale, stats=IMAGENET_STATS):
    """The random choices of one training crop, from its stateless seed (int [2]):
    S (int32, uniform in [Smin, Smax]), crop position [2] (uniform in [0, 1)), mirror (bool, probability 1/2),
    colour offset [3] (alpha_i ~ N(0, 0.1)). Drawn together: few ops per image."""
    uniform_seed, normal_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    uniform = tf.random.stateless_uniform([4], uniform_seed)
    smin, smax = scale
    smallest_side = tf.minimum(smin + tf.cast(uniform[0] * (smax - smin + 1), tf.int32), smax)
    alpha = tf.random.stateless_normal([3], normal_seed, stddev=0.1)
    return smallest_side, uniform[1:3], uniform[3] < 0.5, pca_color_offset(alpha, stats)


def _resize_window(window, crop):
    """The decoded window resized to crop x crop, float32."""
    # Plain bilinear shrinking by more than 2x aliases, so that takes the (slower) antialiased resize; JPEG windows
    # arrive already reduced below 2x by `decode_window`. Resizing float32 is faster than resizing uint8.
    window = tf.cast(window, tf.float32)
    image = tf.cond(tf.reduce_min(tf.shape(window)[:2]) > 2 * crop,
                    lambda: tf.image.resize(window, [crop, crop], method="bilinear", antialias=True),
                    lambda: tf.image.resize(window, [crop, crop], method="bilinear"))
    return tf.ensure_shape(image, [crop, crop, 3])


def train_transform(data, seed, scale, crop, stats=IMAGENET_STATS, flip=True, color_shift=True):
    """Encoded image bytes -> one augmented, mean-subtracted float32 [crop, crop, 3] training crop.

    `seed`: int [2] stateless seed of this element; `scale`: (Smin, Smax), already validated by `check_crop`.
    """
    smallest_side, position, mirror, color_offset = training_choices(seed, scale, stats)
    window = decode_window(data, random_window(smallest_side, crop, position), crop)
    if flip:  # the same as flipping the crop (the resize is symmetric), on fewer, uint8 pixels
        window = tf.cond(mirror, lambda: tf.reverse(window, [1]), lambda: window)
    shift = -tf.constant(stats.mean_rgb, tf.float32)
    if color_shift:
        shift += color_offset
    return add_per_channel(_resize_window(window, crop), shift)  # colour shift and mean subtraction in one pass


def eval_transform(data, q, crop, stats=IMAGENET_STATS):
    """Encoded image bytes -> the central crop x crop crop of the image rescaled to smallest side Q, mean-subtracted."""
    return subtract_mean(_resize_window(decode_window(data, center_window(q, crop), crop), crop), stats.mean_rgb)


def element_seeds(seed):
    """One int64 per element, for `stateless_seed`; a fixed `seed` gives the same numbers in every run and new
    ones in each epoch."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)


def stateless_seed(element_seed):
    """The shape-[2] seed of the stateless random ops, from an element's int64 seed."""
    return tf.stack([element_seed, tf.zeros_like(element_seed)])


def train_dataset(src, batch_size, scale=(256, 256), crop=224, stats=IMAGENET_STATS, seed=None, split="train",
                  flip=True, color_shift=True, shuffle=True):
    """Batches (images float32 [b, crop, crop, 3], labels int64 [b]) of one epoch of augmented training crops."""
    _check_batch_size(batch_size)
    check_split(split)
    scale = check_crop(scale, crop)
    records = tf.data.Dataset.zip(src.records(split, shuffle=shuffle, seed=seed), element_seeds(seed))
    return checked_batches(
        records, lambda data, element_seed: train_transform(data, stateless_seed(element_seed), scale, crop, stats,
                                                            flip, color_shift),
        tf.zeros([crop, crop, 3]), batch_size, **expected_records(src, split))


def val_dataset(src, batch_size, crop=224, q=256, stats=IMAGENET_STATS, split="val"):
    """Batches (images, labels) for validation during training: rescale to smallest side Q, centre crop."""
    _check_batch_size(batch_size)
    check_split(split)
    check_crop(q, crop, scale_flag="--q")
    require_examples(src, split)  # before any training step: an empty validation split cannot drive the schedule
    return checked_batches(src.records(split), lambda data: eval_transform(data, q, crop, stats),
                           tf.zeros([crop, crop, 3]), batch_size, **expected_records(src, split))
