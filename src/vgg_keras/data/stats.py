"""Training-set colour statistics: mean RGB (for mean subtraction) and the RGB covariance's
eigen-decomposition (for the PCA colour shift of Krizhevsky et al.)."""

import dataclasses
import json

import numpy as np


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
