"""Training-set colour statistics: mean RGB (for mean subtraction) and the RGB covariance's
eigen-decomposition (for the PCA colour shift of Krizhevsky et al.)."""

import dataclasses
import json

import numpy as np
import tensorflow as tf
import tqdm


@dataclasses.dataclass(frozen=True)
class ColorStats:
    mean_rgb: tuple  # 3 floats, 0-255 scale
    eigenvalues: tuple  # 3 floats, of the 3x3 covariance of RGB values scaled to [0, 1]
    eigenvectors: tuple  # 3x3, columns are the eigenvectors p_i
    source: str = "imagenet"

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path):
        try:
            with open(path) as f:
                raw = json.load(f)
            stats = cls(
                mean_rgb=tuple(float(v) for v in raw["mean_rgb"]),
                eigenvalues=tuple(float(v) for v in raw["eigenvalues"]),
                eigenvectors=tuple(tuple(float(v) for v in row) for row in raw["eigenvectors"]),
                source=raw.get("source", str(path)),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a colour statistics file ({err})") from None
        if len(stats.mean_rgb) != 3 or len(stats.eigenvalues) != 3 or np.shape(stats.eigenvectors) != (3, 3):
            raise ValueError(f"{path}: mean_rgb and eigenvalues need 3 values, eigenvectors 3x3")
        return stats


# The documented default when no `vgg-keras stats` file is given: ImageNet's mean RGB (as used by the
# released Caffe VGG models) and the eigen-decomposition of Krizhevsky et al. of pixels scaled to
# [0, 1] -- the convention everywhere here: the colour shift sum_i alpha_i lambda_i p_i is computed in
# [0, 1] units, then multiplied by 255.
IMAGENET_STATS = ColorStats(
    mean_rgb=(123.68, 116.779, 103.939),
    eigenvalues=(0.2175, 0.0188, 0.0045),
    eigenvectors=(
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    ),
    source="imagenet",
)


def _pixel_moments(image):
    """Pixel count, sum and sum of outer products of one float32 RGB 0-255 image, in [0, 1] units centred on 0.5
    (centring keeps the float32 sums accurate; the covariance does not depend on it)."""
    pixels = tf.reshape(image, [-1, 3]) / 255.0 - 0.5
    return tf.shape(pixels, out_type=tf.int64)[0], tf.reduce_sum(pixels, 0), tf.matmul(pixels, pixels, transpose_a=True)


def compute_stats(source, split="train", max_images=None, seed=0):
    """Mean RGB and the eigen-decomposition of the 3x3 RGB covariance over every pixel of the split's images
    (or of `max_images` of them, drawn at random with `seed`), streamed with a progress bar."""
    from .decode import decode_records

    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"--max-images {max_images!r}: must be a positive integer")
    records = source.records(split, shuffle=max_images is not None, seed=seed)
    if max_images is not None:
        records = records.take(max_images)
    moments = decode_records(records).map(lambda record: _pixel_moments(record["image"]),
                                          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    total = min(filter(None, (source.num_examples(split), max_images)), default=None)
    count, images, first, second = 0, 0, np.zeros(3), np.zeros((3, 3))
    for n, s, ss in tqdm.tqdm(moments.as_numpy_iterator(), total=total, desc=f"stats {split}", unit="img"):
        count, images = count + n, images + 1
        first += s
        second += ss
    if count == 0:
        raise ValueError(f"--data {source.spec}: no decodable image in the {split} split")
    mean = first / count
    covariance = second / count - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]  # largest first, like IMAGENET_STATS
    return ColorStats(mean_rgb=tuple(float(v) for v in 255.0 * (mean + 0.5)),
                      eigenvalues=tuple(float(v) for v in eigenvalues[order]),
                      eigenvectors=tuple(tuple(float(v) for v in row) for row in eigenvectors[:, order]),
                      source=f"{source.spec} ({split}, {images} images)")
