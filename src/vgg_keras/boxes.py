"""Bounding boxes for localisation (PAPER.md section 5): their convention, IoU, the three box-file formats, the
training transform's effect on a box, the regression target, and OverFeat's greedy merging.

Convention. A box is float [x0, y0, x1, y1] in *continuous pixel coordinates* of the image it belongs to: the image
spans [0, W] x [0, H] and pixel (i, j) covers [j, j + 1) x [i, i + 1). Its width is x1 - x0. Formats that give
inclusive pixel indices (PASCAL VOC / ILSVRC XML, the Kaggle CSV: xmin..xmax both inside the box, 0-based) are
converted on reading to [xmin, ymin, xmax + 1, ymax + 1]; ILSVRC's evaluation IoU, which counts pixels
((xmax - xmin + 1) * (ymax - ymin + 1)), is then exactly the continuous IoU of the converted boxes (`iou`).

Box files (`load_boxes`), each giving image key -> (annotation frame, [(label, box), ...]):
    annotations.json   written by `vgg-keras make-demo-data`: {"classes", "images": [{"file", "label", "width",
                       "height", "box": [x0, y0, x1, y1]}]}, continuous coordinates; key = "file" without extension
    DIR/**.xml         PASCAL-VOC style (ILSVRC bbox_train / bbox_val): <size><width/><height/></size> and
                       <object><name>wnid</name><bndbox><xmin/>...</bndbox></object>; the coordinates are relative
                       to <size>, which can differ from the real image (`frame`); key = the file's stem
    FILE.csv           Kaggle's LOC_*_solution.csv: ImageId,PredictionString = repeated "wnid xmin ymin xmax ymax";
                       no size: coordinates are the image's own; key = ImageId
Bad boxes never crash a run: non-numbers, unknown classes and boxes empty after clipping (min >= max) are skipped,
boxes reaching outside the frame are clipped; `BoxSet.counts` counts each kind.

The regression target (`crop_target`): the box in the coordinates of the training crop, as the paper's
(centre x, centre y, width, height), in units of the crop side: a box filling the crop is (0.5, 0.5, 1, 1). The box
is *not* clipped to the crop: the net learns the whole object's extent from the part it sees. A crop that shows
less than half of its box's area (OverFeat's rule) gets training weight 0; the box kept for a crop showing several
ground-truth boxes is the one with the largest visible area.
"""

import csv
import dataclasses
import json
import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import tensorflow as tf

from .data.images import displayed_size
from .data.pipeline import center_window, random_window, training_choices

MIN_VISIBLE = 0.5  # OverFeat: windows overlapping the box by less than half do not train the regressor
MERGE_IOU = 0.5  # greedy merging: two boxes are "close" when their IoU is at least this


# ---------------------------------------------------------------------------------------------------------
# IoU


def iou(a, b):
    """IoU of boxes a [..., 4] and b [..., 4] (broadcast), [x0, y0, x1, y1] continuous coordinates (see the module
    docstring; ILSVRC's inclusive-pixel IoU is this on converted boxes). float64 numpy; 0 where the union is empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def area(boxes):
    boxes = np.asarray(boxes, np.float64)
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def tf_iou(a, b):
    """`iou` as TensorFlow ops (float32), for graphs: a [..., 4], b [..., 4], broadcast."""
    inter_w = tf.nn.relu(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]))
    inter_h = tf.nn.relu(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]))
    inter = inter_w * inter_h
    area_a = tf.nn.relu(a[..., 2] - a[..., 0]) * tf.nn.relu(a[..., 3] - a[..., 1])
    area_b = tf.nn.relu(b[..., 2] - b[..., 0]) * tf.nn.relu(b[..., 3] - b[..., 1])
    return tf.math.divide_no_nan(inter, area_a + area_b - inter)


# ---------------------------------------------------------------------------------------------------------
# Box files


@dataclasses.dataclass
class BoxSet:
    """Ground-truth boxes of a box file. images: {key: (frame, [(label, box), ...])}, frame = (width, height) of the
    coordinates or None (the image's own pixels), label = class index, box = [x0, y0, x1, y1] float in the frame.
    counts: {"boxes", "clipped", "skipped_unknown_class", "skipped_empty", "skipped_malformed"}."""

    path: str
    images: dict
    counts: dict

    def __len__(self):
        return len(self.images)

    def key_depth(self):
        """The most path components of a key ('train/circle/0000': 3)."""
        return max((key.count("/") + 1 for key in self.images), default=1)

    def find(self, file_id):
        """The entry of an image file path or id: its longest trailing path (extension removed) that is a key."""
        parts = os.path.splitext(str(file_id).replace(os.sep, "/"))[0].split("/")
        for depth in range(min(self.key_depth(), len(parts)), 0, -1):
            entry = self.images.get("/".join(parts[-depth:]))
            if entry is not None:
                return entry
        return None

    def padded(self, max_boxes=None):
        """(keys [n], labels int32 [n, m], boxes float32 [n, m, 4], frames float32 [n, 2]) with m the most boxes of
        an image; padding rows have label -1. A frame of (0, 0) means the image's own pixels."""
        keys = list(self.images)
        m = max_boxes or max((len(entries) for _, entries in self.images.values()), default=1)
        labels = np.full((len(keys), m), -1, np.int32)
        boxes = np.zeros((len(keys), m, 4), np.float32)
        frames = np.zeros((len(keys), 2), np.float32)
        for row, key in enumerate(keys):
            frame, entries = self.images[key]
            frames[row] = frame or (0, 0)
            for col, (label, box) in enumerate(entries[:m]):
                labels[row, col], boxes[row, col] = label, box
        return keys, labels, boxes, frames


class _Reader:
    """Collects boxes with their checks and counts."""

    def __init__(self, class_names):
        self.index = {name: i for i, name in enumerate(class_names)}
        self.images = {}
        self.counts = dict.fromkeys(("boxes", "clipped", "skipped_unknown_class", "skipped_empty",
                                     "skipped_malformed"), 0)

    def add(self, key, frame, name, coordinates, inclusive):
        """One box of image `key`; `coordinates` (x0, y0, x1, y1) as read (strings or numbers)."""
        entry = self.images.setdefault(key, (frame, []))
        if name not in self.index:
            self.counts["skipped_unknown_class"] += 1
            return
        try:
            box = [float(v) for v in coordinates]
        except (TypeError, ValueError):
            box = []
        if len(box) != 4 or not np.all(np.isfinite(box)):
            self.counts["skipped_malformed"] += 1
            return
        if inclusive:
            box[2] += 1
            box[3] += 1
        limits = [0, 0, *(frame or (np.inf, np.inf))]
        clipped = [min(max(v, 0), limits[2 + i % 2]) for i, v in enumerate(box)]
        if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
            self.counts["skipped_empty"] += 1
            return
        self.counts["clipped"] += clipped != box
        self.counts["boxes"] += 1
        entry[1].append((self.index[name], clipped))

    def box_set(self, path):
        images = {key: entry for key, entry in self.images.items() if entry[1]}
        return BoxSet(path=str(path), images=images, counts=self.counts)


def read_demo_annotations(path, class_names):
    """annotations.json of `make-demo-data` (continuous coordinates in the image's frame)."""
    with open(path) as f:
        data = json.load(f)
    reader = _Reader(class_names)
    for item in data.get("images", []):
        frame = (float(item["width"]), float(item["height"])) if "width" in item and "height" in item else None
        reader.add(os.path.splitext(item["file"])[0].replace(os.sep, "/"), frame, item.get("label"),
                   item.get("box"), inclusive=False)
    return reader.box_set(path)


def _xml_number(element, tag):
    node = element.find(tag)
    return None if node is None or node.text is None else node.text.strip()


def _xml_frame(tree):
    """(width, height) of the file's <size>, or None (missing, not numbers, not positive): the image's own."""
    size = tree.find("size")
    try:
        frame = (float(_xml_number(size, "width")), float(_xml_number(size, "height")))
    except (AttributeError, TypeError, ValueError):
        return None
    return frame if min(frame) > 0 and np.all(np.isfinite(frame)) else None


def read_voc_folder(directory, class_names):
    """A folder (searched recursively) of PASCAL-VOC-style XML files, ILSVRC's bbox_train / bbox_val: inclusive
    pixel coordinates relative to the file's <size>, floats accepted. A file that is not such XML counts as one
    malformed box."""
    reader = _Reader(class_names)
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(f for f in files if f.lower().endswith(".xml")):
            key = os.path.splitext(name)[0]
            try:
                tree = ElementTree.parse(os.path.join(root, name)).getroot()
            except ElementTree.ParseError:
                reader.counts["skipped_malformed"] += 1
                continue
            frame = _xml_frame(tree)
            for obj in tree.iter("object"):
                bndbox = obj.find("bndbox")
                coordinates = [None] * 4 if bndbox is None else [_xml_number(bndbox, t)
                                                                 for t in ("xmin", "ymin", "xmax", "ymax")]
                reader.add(key, frame, _xml_number(obj, "name"), coordinates, inclusive=True)
    return reader.box_set(directory)


def read_kaggle_csv(path, class_names):
    """Kaggle's ImageNet localisation CSV: ImageId,PredictionString ("wnid xmin ymin xmax ymax" repeated),
    inclusive pixel coordinates of the image itself."""
    reader = _Reader(class_names)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            fields = (row.get("PredictionString") or "").split()
            key = (row.get("ImageId") or "").strip()
            if not key or len(fields) % 5:
                reader.counts["skipped_malformed"] += max(1, len(fields) // 5)
                continue
            for i in range(0, len(fields), 5):
                reader.add(key, None, fields[i], fields[i + 1:i + 5], inclusive=True)
    return reader.box_set(path)


def load_boxes(path, class_names):
    """The BoxSet of `path` (--boxes): a demo annotations.json, a folder of VOC/ILSVRC XML files or a Kaggle CSV.
    Raises FileNotFoundError / ValueError naming the path when it is none of these or holds no usable box."""
    path = os.fspath(path)
    if os.path.isdir(path):
        boxes = read_voc_folder(path, class_names)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"--boxes {path}: no such file or directory")
    elif path.lower().endswith(".json"):
        boxes = read_demo_annotations(path, class_names)
    elif path.lower().endswith(".csv"):
        boxes = read_kaggle_csv(path, class_names)
    else:
        raise ValueError(f"--boxes {path}: expected annotations.json, a folder of XML files or a .csv file")
    if not boxes.images:
        raise ValueError(f"--boxes {path}: no usable box for the {len(class_names)} classes ({boxes.counts})")
    return boxes


# ---------------------------------------------------------------------------------------------------------
# Boxes through the transforms


def image_shape(data):
    """[h, w] int32 of encoded image bytes as displayed (EXIF orientation applied, the frame of `decode_window`'s
    windows and of `decode_rgb`): `data.images.displayed_size`."""
    return displayed_size(data)


def to_image_frame(boxes, frame, shape):
    """boxes [..., 4] given in an annotation `frame` [2] (width, height; (0, 0): the image's own) -> the image of
    `shape` [h, w]: scaled by image size / frame size on each axis."""
    size = tf.cast(tf.stack([shape[1], shape[0]]), tf.float32)
    ratio = tf.where(frame > 0, size / tf.where(frame > 0, frame, 1.0), 1.0)
    return tf.cast(boxes, tf.float32) * tf.tile(ratio, [2])


def window_to_crop(boxes, window, crop, mirror):
    """boxes [..., 4] in image pixels -> pixels of the crop x crop crop made of `window` [top, left, height, width]
    (as `decode_window` cuts and resizes it), mirrored horizontally when `mirror`."""
    window = tf.cast(window, tf.float32)
    origin = tf.stack([window[1], window[0], window[1], window[0]])
    per_pixel = tf.stack([window[3], window[2], window[3], window[2]]) / crop
    boxes = (tf.cast(boxes, tf.float32) - origin) / per_pixel
    flipped = tf.stack([crop - boxes[..., 2], boxes[..., 1], crop - boxes[..., 0], boxes[..., 3]], axis=-1)
    return tf.where(mirror, flipped, boxes)


def crop_to_window(boxes, window, crop, mirror):
    """The inverse of `window_to_crop`: boxes [..., 4] in crop pixels -> image pixels."""
    boxes = tf.cast(boxes, tf.float32)
    boxes = tf.where(mirror, tf.stack([crop - boxes[..., 2], boxes[..., 1], crop - boxes[..., 0], boxes[..., 3]],
                                      axis=-1), boxes)
    window = tf.cast(window, tf.float32)
    origin = tf.stack([window[1], window[0], window[1], window[0]])
    per_pixel = tf.stack([window[3], window[2], window[3], window[2]]) / crop
    return boxes * per_pixel + origin


def to_center_size(boxes, crop):
    """[x0, y0, x1, y1] in crop pixels -> the regression target (cx, cy, w, h) in crop units."""
    return tf.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
                     boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], axis=-1) / crop


def from_center_size(params, crop):
    """(cx, cy, w, h) in crop units -> [x0, y0, x1, y1] in crop pixels (negative sizes taken as 0)."""
    params = tf.cast(params, tf.float32) * crop
    half_w, half_h = tf.nn.relu(params[..., 2]) / 2, tf.nn.relu(params[..., 3]) / 2
    return tf.stack([params[..., 0] - half_w, params[..., 1] - half_h, params[..., 0] + half_w,
                     params[..., 1] + half_h], axis=-1)


def crop_target(boxes, labels, crop):
    """The target of one crop from its ground-truth boxes [m, 4] (crop pixels) and labels [m] (-1: padding):
    (label float32, cx, cy, w, h) [5] of the box with the largest visible area, and its weight (1.0, or 0.0 when it
    shows less than MIN_VISIBLE of its area)."""
    valid = labels >= 0
    visible = tf.nn.relu(tf.minimum(boxes[:, 2], crop) - tf.maximum(boxes[:, 0], 0.0)) * tf.nn.relu(
        tf.minimum(boxes[:, 3], crop) - tf.maximum(boxes[:, 1], 0.0))
    total = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = tf.argmax(tf.where(valid, visible, -1.0), output_type=tf.int32)
    fraction = tf.math.divide_no_nan(visible[best], total[best])
    weight = tf.cast(valid[best] & (fraction >= MIN_VISIBLE), tf.float32)
    target = tf.concat([[tf.cast(labels[best], tf.float32)], to_center_size(boxes[best], crop)], 0)
    return target, weight


def train_box_target(data, seed, boxes, labels, frame, scale, crop):
    """The regression target and weight (`crop_target`) of the training crop that `pipeline.train_transform(data,
    seed, scale, crop, ...)` makes: the same `training_choices` (S, position, mirror) and the same `random_window`
    give the same window, so the box sees the pixels' numbers exactly."""
    smallest_side, position, mirror, _ = training_choices(seed, scale)
    shape = image_shape(data)
    window = random_window(smallest_side, crop, position)(shape)
    return crop_target(window_to_crop(to_image_frame(boxes, frame, shape), window, crop, mirror), labels, crop)


def center_box_target(data, boxes, labels, frame, q, crop):
    """The target of the centre crop at Q (`pipeline.eval_transform`'s window); weight 1 (every image counts)."""
    shape = image_shape(data)
    window = center_window(q, crop)(shape)
    target, _ = crop_target(window_to_crop(to_image_frame(boxes, frame, shape), window, crop, False), labels, crop)
    return target, tf.constant(1.0)


# ---------------------------------------------------------------------------------------------------------
# Greedy merging (OverFeat, Sermanet et al. 2014, section 4.3)


def merge_boxes(boxes, threshold=MERGE_IOU):
    """Merge spatially close boxes greedily: while the two closest boxes have IoU >= `threshold`, replace them by
    their average, weighted by how many predictions each already merged. Returns (merged float32 [k, 4],
    support int32 [k]: the predictions each merged box averages), in the order of their first member.

    boxes: float32 [n, 4] (any n, 0 included). TensorFlow ops only (a while loop), so export uses it in the
    serving graph; evaluation calls it through a tf.function (`merge_boxes_fn`).
    """
    boxes = tf.cast(tf.reshape(boxes, [-1, 4]), tf.float32)
    n = tf.shape(boxes)[0]
    counts = tf.ones([n], tf.float32)
    active = tf.ones([n], tf.bool)

    def closest(boxes, active):
        """(IoU, i, j) of the closest pair of active boxes; IoU -1 when there is no pair."""
        overlaps = tf_iou(boxes[:, None, :], boxes[None, :, :])
        pair_ok = active[:, None] & active[None, :] & ~tf.eye(n, dtype=tf.bool)
        values = tf.concat([tf.reshape(tf.where(pair_ok, overlaps, -1.0), [-1]), [-1.0]], 0)  # never empty
        flat = tf.argmax(values, output_type=tf.int32)
        return values[flat], flat // tf.maximum(n, 1), flat % tf.maximum(n, 1)

    def cond(boxes, counts, active):
        best, _, _ = closest(boxes, active)
        return best >= threshold

    def body(boxes, counts, active):
        _, i, j = closest(boxes, active)
        keep, drop = tf.minimum(i, j), tf.maximum(i, j)
        total = counts[keep] + counts[drop]
        merged = (boxes[keep] * counts[keep] + boxes[drop] * counts[drop]) / total
        boxes = tf.tensor_scatter_nd_update(boxes, [[keep]], merged[None])
        counts = tf.tensor_scatter_nd_update(counts, [[keep]], [total])
        active = tf.tensor_scatter_nd_update(active, [[drop]], [False])
        return boxes, counts, active

    boxes, counts, active = tf.while_loop(cond, body, (boxes, counts, active))
    return tf.boolean_mask(boxes, active), tf.cast(tf.boolean_mask(counts, active), tf.int32)


def best_merged_box(boxes, threshold=MERGE_IOU):
    """The merged box (`merge_boxes`) with the largest support (the first of equals): float32 [4]; the class's one
    box. boxes [n >= 1, 4]."""
    merged, support = merge_boxes(boxes, threshold)
    return merged[tf.argmax(support, output_type=tf.int32)]
