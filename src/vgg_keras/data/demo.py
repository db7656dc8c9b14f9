"""The embedded demo data set: `vgg-keras make-demo-data DIR`, the default data of `make train`.

Ten classes of shapes, each drawn once per image at a random size (50-90 % of the shorter side), position
(its centre within 15 % of the image's centre: a centre crop of the rescaled image sees most of it), rotation
(within ±20°) and colour, on a cluttered background (noise, lines, blobs in colours near the background's, so that
they texture the scene without competing with the object), in images of varied size and aspect ratio (3:4 to
4:3); `--object-range` / `--centre-spread` widen the sizes and positions. Colour says nothing about the class, so
a classifier must learn shape; the objects' varied scale and position are what scale jittering and multi-crop
evaluation are for. Deterministic for a seed.

    DIR/train/<class>/<n>.jpg, DIR/val/<class>/<n>.jpg
    DIR/annotations.json   {"classes": [...], "images": [{"file", "label", "width", "height",
                                                          "box": [xmin, ymin, xmax, ymax]}, ...]}
"""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "arrow", "hexagon", "chevron")
SIDE_RANGE = (56, 120)  # image sides, pixels (training rescales them to S = 32-40)
ASPECT_RANGE = (0.75, 4 / 3)  # width / height: wider images would put objects outside the centre crop
OBJECT_RANGE = (0.5, 0.9)  # object size / shorter image side
CENTRE_SPREAD = 0.15  # the object's centre lies within this fraction of the width (height) of the image's centre
TRAIN_PER_CLASS, VAL_PER_CLASS = 500, 50
CLUTTER_CONTRAST = 50  # clutter colours differ from the background by at most this per channel
MAX_ROTATION = 20  # degrees: more would turn a square into a diamond, an arrow into a chevron


def _polygon(points, cx, cy, radius, angle):
    """Unit-circle `points` (x, y) rotated by `angle`, scaled by `radius`, centred at (cx, cy)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _regular(n, start=-math.pi / 2):
    return [(math.cos(start + 2 * math.pi * i / n), math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _star():
    return [(r * math.cos(-math.pi / 2 + math.pi * i / 5), r * math.sin(-math.pi / 2 + math.pi * i / 5))
            for i, r in zip(range(10), [1, 0.42] * 5)]


# Outlines in unit coordinates (radius 1 around the centre); circle and ring are drawn as ellipses.
OUTLINES = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "triangle": _regular(3),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "star": _star(),
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
    "hexagon": _regular(6, start=0),
    "chevron": [(-0.9, -0.9), (-0.3, -0.9), (0.5, 0), (-0.3, 0.9), (-0.9, 0.9), (-0.1, 0)],
}


def _colour(rng, avoid=None, min_distance=160):
    """A random RGB colour, at least `min_distance` away from `avoid` (so the object stands out)."""
    while True:
        colour = rng.integers(0, 256, size=3)
        if avoid is None or np.linalg.norm(colour - avoid) >= min_distance:
            return tuple(int(c) for c in colour)


def _clutter_colour(rng, base):
    """A colour near the background's: clutter textures the scene without competing with the object."""
    return tuple(int(c) for c in np.clip(base + rng.integers(-CLUTTER_CONTRAST, CLUTTER_CONTRAST + 1, size=3), 0, 255))


def _background(rng, width, height):
    """Noise around a random base colour, with random lines and small polygons as clutter."""
    base = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 15, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(4, 10))):
        points = [tuple(int(v) for v in rng.integers(0, [width, height])) for _ in range(2)]
        draw.line(points, fill=_clutter_colour(rng, base), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(3, 8))):  # small irregular blobs, well below the objects' size
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.15) * short
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 7))))
        draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles],
                     fill=_clutter_colour(rng, base))
    return image, base


def draw_example(rng, label, object_range=OBJECT_RANGE, centre_spread=CENTRE_SPREAD):
    """One image (PIL, RGB) with one object of class `label`, and its box [xmin, ymin, xmax, ymax] (pixels).
    object_range: (min, max) object size / shorter image side; centre_spread: the object's centre lies within this
    fraction of the width (height) of the image's centre."""
    aspect = rng.uniform(*ASPECT_RANGE)
    side = rng.uniform(*SIDE_RANGE)
    width, height = (int(side), int(side / aspect)) if aspect >= 1 else (int(side * aspect), int(side))
    width, height = max(width, SIDE_RANGE[0] // 2), max(height, SIDE_RANGE[0] // 2)
    image, base = _background(rng, width, height)
    radius = rng.uniform(*object_range) * min(width, height) / 2
    cx = rng.uniform(max(radius, width * (0.5 - centre_spread)), min(width - radius, width * (0.5 + centre_spread)))
    cy = rng.uniform(max(radius, height * (0.5 - centre_spread)),
                     min(height - radius, height * (0.5 + centre_spread)))
    colour = _colour(rng, avoid=base)
    draw = ImageDraw.Draw(image)
    if label in ("circle", "ring"):
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=colour)
        if label == "ring":
            inner = radius * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=tuple(int(c) for c in base))
    else:
        points = _polygon(OUTLINES[label], cx, cy, radius, math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION)))
        draw.polygon(points, fill=colour)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        box = [min(xs), min(ys), max(xs), max(ys)]
    box = [max(0, round(box[0])), max(0, round(box[1])), min(width, round(box[2])), min(height, round(box[3]))]
    return image, box


def make_demo_data(out_dir, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0, classes=CLASSES,
                   object_range=OBJECT_RANGE, centre_spread=CENTRE_SPREAD):
    """Write the demo data set under `out_dir` (see the module docstring); returns the annotation dict.
    `object_range` and `centre_spread` (see `draw_example`): wider ones give boxes that vary more, which a
    localisation experiment needs (the default objects are so large and central that a constant box fits them
    well). Raises FileExistsError for a non-empty `out_dir`, ValueError for ranges outside (0, 1] / [0, 0.5]."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose an empty or new directory")
    low, high = object_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"object range {low}-{high}: sizes are fractions of the shorter side, 0 < min <= max <= 1")
    if not 0 <= centre_spread <= 0.5:
        raise ValueError(f"centre spread {centre_spread}: a fraction of the image's side, 0 to 0.5")
    rng = np.random.default_rng(seed)
    annotations = {"classes": list(classes), "seed": seed, "images": []}
    jobs = [(split, label, i) for split, count in (("train", train_per_class), ("val", val_per_class))
            for label in classes for i in range(count)]
    for split, label, i in tqdm(jobs, desc="demo images", unit="img"):
        image, box = draw_example(rng, label, object_range, centre_spread)
        relative = os.path.join(split, label, f"{i:04d}.jpg")
        os.makedirs(os.path.join(out_dir, split, label), exist_ok=True)
        image.save(os.path.join(out_dir, relative), quality=90)
        annotations["images"].append({"file": relative, "label": label, "width": image.width,
                                      "height": image.height, "box": box})
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(annotations, f)
    return annotations
