"""Transfer features (PAPER.md section 6, the paper's Appendix B): a trained net as an image descriptor.

The last layer is removed and the penultimate layer's activations (fc2, 4096-D) of the fully-convolutional net
(`model.fully_convolutional`) are computed densely over the whole image at each test scale Q through
`evaluate.dense_maps`, the one dense-application path. Per model and image:

    per Q       the activation map [h', w', d] averaged spatially, and averaged with the mirror image's -> [d]
    over Q      averaged (the paper's VOC setting) -> [d], or stacked (its Caltech setting) -> [len(Q) * d]
    then        L2-normalised

Several models' descriptors (the paper's D & E) are stacked and the whole L2-normalised again, so every row of the
output has unit norm. `layer` may name another layer of the dense net (block5_pool, fc1): it is spatially averaged
the same way.

`extract_features` streams a data split into a compressed .npz (see `write_features`): chunks of images are saved
as they are done into a hidden folder beside the output, so an interrupted extraction resumes where it stopped,
and the .npz only appears (atomically) when every image is in.
"""

import dataclasses
import glob
import io
import json
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from .evaluate import decoded_images, dense_maps, parse_scales
from .model import fully_convolutional
from .runs import Run, atomic_path, load_run

PAPER_SCALES = (256, 384, 512)  # the paper's Q for its transfer descriptors
COMBINES = ("average", "stack")
DEFAULT_LAYER = "fc2"
CHUNK_IMAGES = 64  # images per resumable chunk
FORMAT_VERSION = 1


def l2_normalize(x, eps=1e-12):
    """Rows of `x` [..., d] scaled to unit L2 norm (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_combine(combine):
    if combine not in COMBINES:
        raise ValueError(f"--combine {combine!r}: expected one of {', '.join(COMBINES)}")
    return combine


class FeatureExtractor:
    """One model as a dense feature extractor: the sub-model of `fully_convolutional(model)` ending at `layer`, as a
    tf.function on float32 [n, H, W, 3] of any size (traced once), with the run's mean RGB and crop.

    Raises ValueError when the model has no such layer (the message lists the valid names).
    """

    def __init__(self, run, layer=DEFAULT_LAYER):
        self.run, self.layer = run, layer
        dense = fully_convolutional(run.model)
        names = [entry.name for entry in dense.layers[1:]]
        if layer not in names:
            raise ValueError(f"--layer {layer!r}: {run.path} has no such layer; valid layers: {', '.join(names)}")
        # The dense net's layers applied again up to `layer` (weights shared): its conv layers are also the FC
        # model's, so `dense.get_layer(layer).output` would be a tensor of the FC model's graph.
        inputs = keras.Input(shape=(None, None, dense.input_shape[-1]), name="input_layer")
        x = inputs
        for entry in dense.layers[1:names.index(layer) + 2]:
            x = entry(x)
        self.net = keras.Model(inputs, x, name=f"{dense.name}_{layer}")
        self.dim = int(self.net.output_shape[-1])
        self.mean_rgb, self.crop = tuple(run.stats.mean_rgb), int(run.crop)
        self.maps = tf.function(lambda images: self.net(images, training=False),
                                input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])

    def scale_descriptors(self, image, scales, flip=True):
        """float32 [len(scales), d]: at each Q the layer's map of `image` (float32 [h, w, 3], RGB 0-255) averaged
        spatially and over the image and its mirror (`flip`)."""
        return np.stack([tf.reduce_mean(tf.cast(dense_maps(self.maps, image, q, self.mean_rgb, self.crop, flip),
                                                tf.float32), axis=[0, 1, 2]).numpy() for q in scales])

    def describe(self, image, scales, combine="average", flip=True):
        """The model's descriptor of `image`: [d] (average over Q) or [len(scales) * d] (stack), L2-normalised."""
        per_scale = self.scale_descriptors(image, scales, flip)
        return l2_normalize(per_scale.mean(axis=0) if check_combine(combine) == "average" else per_scale.ravel())

    def output_dim(self, scales, combine):
        return self.dim * (len(scales) if combine == "stack" else 1)


def image_features(extractors, image, scales, combine="average", flip=True):
    """float32 [sum of the models' dims]: the models' descriptors of `image` stacked, L2-normalised."""
    return l2_normalize(np.concatenate([e.describe(image, scales, combine, flip) for e in extractors]))


@dataclasses.dataclass
class FeatureSource:
    """Where feature images come from: `class_names`, `records(split)` ({"image" bytes, "label", "id"}), and
    `multilabel` (labels int8 [classes]: 1 present, 0 absent, -1 present only as difficult objects)."""
    spec: str
    class_names: list
    records: object
    multilabel: bool = False


def voc_label_vector(labels, labels_no_difficult, num_classes):
    """The VOC protocol's per-class target of one image, int8 [num_classes]: 1 where a non-difficult object of the
    class is present, -1 where the class is present only as difficult objects (ignored by AP), 0 elsewhere.
    labels / labels_no_difficult: int class indices (TFDS voc `labels`, `labels_no_difficult`)."""
    present = tf.reduce_max(tf.one_hot(labels, num_classes, dtype=tf.int32), axis=0)
    easy = tf.reduce_max(tf.one_hot(labels_no_difficult, num_classes, dtype=tf.int32), axis=0)
    return tf.cast(tf.where(easy > 0, 1, -present), tf.int8)


class MultiLabelTFDS:
    """A TFDS data set laid out like `voc/2007`: an Image `image`, a Sequence(ClassLabel) `labels` and optionally
    `labels_no_difficult`. Our "train" is its train+validation (VOC's trainval), "val" its test split."""

    SPLITS = {"train": "train+validation", "val": "test"}

    def __init__(self, name, builder):
        self.name, self.builder = name, builder
        features = builder.info.features
        self.class_names = list(features["labels"].feature.names)
        self._difficult = "labels_no_difficult" in features

    def records(self, split):
        import tensorflow_datasets as tfds

        if split not in self.SPLITS:
            raise ValueError(f"--split {split!r}: expected train or val")
        try:  # never downloaded here: VOC is prepared beforehand (`tfds build voc/2007 --data_dir DIR`)
            ds = self.builder.as_dataset(split=self.SPLITS[split], decoders={"image": tfds.decode.SkipDecoding()},
                                         read_config=tfds.ReadConfig(add_tfds_id=True))
        except (AssertionError, OSError, ValueError) as err:
            raise ValueError(f"--data {self.name}: not prepared in the TFDS data directory ({err}); prepare it "
                             f"first, e.g. `tfds build {self.name[len('tfds:'):]} --data_dir DIR`") from err
        return ds.map(self.record, num_parallel_calls=tf.data.AUTOTUNE)

    def record(self, example):
        """A TFDS example in voc layout -> {"image", "label" int8 [classes], "id"}."""
        easy = example["labels_no_difficult"] if self._difficult else example["labels"]
        file_id = example["image/filename"] if "image/filename" in example else example["tfds_id"]
        return {"image": example["image"], "id": file_id,
                "label": voc_label_vector(example["labels"], easy, len(self.class_names))}


def _multilabel_builder(spec, data_dir):
    """The TFDS builder of `spec` when it is a multi-label (voc-layout) data set, else None."""
    if not spec.startswith("tfds:"):
        return None
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec[len("tfds:"):], data_dir=data_dir)
    except Exception:  # noqa: BLE001  (an unknown name: load_source reports it)
        return None
    features = builder.info.features
    labels = features["labels"] if "labels" in features else None
    if isinstance(labels, tfds.features.Sequence) and isinstance(labels.feature, tfds.features.ClassLabel):
        return builder
    return None


def load_feature_source(spec, data_dir=None, manual_dir=None, val_fraction=0.1, seed=0):
    """The `--data` of `vgg-keras features`: a multi-label TFDS set in voc layout (tfds:voc/2007), or any source
    of `data.load_source` (class folders, TFRecords, single-label TFDS)."""
    from .data import load_source

    spec = os.fspath(spec)
    builder = _multilabel_builder(spec, data_dir)
    if builder is not None:
        source = MultiLabelTFDS(spec, builder)
        return FeatureSource(spec, source.class_names, source.records, multilabel=True)
    source = load_source(spec, data_dir=data_dir, manual_dir=manual_dir, val_fraction=val_fraction, seed=seed)
    return FeatureSource(spec, list(source.class_names), source.records)


# --- the .npz and its resumable chunks ---------------------------------------------------------------------------

def parts_dir(out):
    """The hidden folder beside `out` holding the chunks of an unfinished extraction."""
    directory, name = os.path.split(os.path.abspath(out))
    return os.path.join(directory, f".parts-{name}")


def _save_npz(path, **arrays):
    """A compressed .npz written atomically (a kill mid-write leaves the previous file, or none)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getvalue())


def write_features(out, features, labels, ids, class_names, settings):
    """Write the feature file: a compressed .npz with features float32 [n, d], labels (int64 [n], or int8 [n, classes]
    for multi-label data), ids (str [n]), class_names (str [classes]) and settings (a JSON string)."""
    _save_npz(out, features=np.asarray(features, np.float32), labels=np.asarray(labels), ids=np.asarray(ids, str),
              class_names=np.asarray(class_names, str), settings=np.asarray(json.dumps(settings)))


def load_features(path):
    """A feature file of `write_features` as {"features", "labels", "ids", "class_names", "settings", "path"}.
    Raises FileNotFoundError, or ValueError naming the file when it is not a feature file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such feature file (write one with `vgg-keras features`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            loaded = {key: data[key] for key in ("features", "labels", "ids", "class_names", "settings")}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a feature file of `vgg-keras features` ({err})") from err
    loaded["settings"] = json.loads(str(loaded["settings"]))
    loaded["class_names"] = [str(name) for name in loaded["class_names"]]
    loaded["path"] = path
    return loaded


def _load_chunks(directory, settings):
    """The chunks already written for `settings` (sorted), or [] for a fresh start. Refuses a folder left by an
    extraction with other settings."""
    settings_path = os.path.join(directory, "settings.json")
    if not os.path.exists(settings_path):
        return []
    with open(settings_path) as f:
        previous = json.load(f)
    if previous != settings:
        raise ValueError(f"{directory} holds an unfinished extraction with other settings; delete it to start over, "
                         "or rerun with the same flags to resume it")
    chunks = []
    for path in sorted(glob.glob(os.path.join(directory, "chunk-*.npz"))):
        with np.load(path, allow_pickle=False) as data:
            chunks.append({key: data[key] for key in data.files})
    return chunks


def extraction_settings(extractors, data, split, scales, combine, layer, flip):
    return {"format": FORMAT_VERSION, "layer": layer, "scales": list(scales), "combine": combine, "flip": flip,
            "data": data, "split": split,
            "models": [{"path": str(e.run.path), "config": e.run.config.get("config") or e.run.model.name,
                        "crop": e.crop, "mean_rgb": list(e.mean_rgb), "dim": e.output_dim(scales, combine)}
                       for e in extractors],
            "dim": sum(e.output_dim(scales, combine) for e in extractors)}


def extract(extractors, records, scales, combine="average", flip=True, settings=None, out=None,
            chunk_images=CHUNK_IMAGES, limit=None, progress=True):
    """Features of every decodable image of `records` ({"image" bytes, "label", "id"}), as
    (features float32 [n, d], labels [n] or [n, classes], ids str [n], timing {"seconds" in the networks,
    "images" described in this call, "images_per_s"}). With `out`, chunks of `chunk_images`
    images are saved beside it as they are done (see `parts_dir`) and a rerun with the same `settings` resumes after
    the last one; undecodable files are skipped (listed in data.SKIPPED)."""
    directory = parts_dir(out) if out else None
    chunks = []
    if directory:
        chunks = _load_chunks(directory, settings)
        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, "settings.json")) as tmp, open(tmp, "w") as f:
            json.dump(settings, f)
    start = int(chunks[-1]["next_index"]) if chunks else 0  # records consumed so far (skipped files included)
    done = sum(len(c["ids"]) for c in chunks)
    if limit is not None:
        records = records.take(limit)
    total = int(records.cardinality()) if records.cardinality() >= 0 else None
    indexed = records.skip(start).enumerate(start).map(lambda i, record: {**record, "index": i})
    pending, seconds = {"features": [], "labels": [], "ids": []}, 0.0

    def flush(next_index):
        if not pending["ids"]:
            return
        chunk = {"features": np.stack(pending["features"]), "labels": np.stack(pending["labels"]),
                 "ids": np.asarray(pending["ids"], str), "next_index": np.int64(next_index)}
        if directory:
            _save_npz(os.path.join(directory, f"chunk-{len(chunks):06d}.npz"), **chunk)
        chunks.append(chunk)
        for values in pending.values():
            values.clear()

    bar = tqdm(total=total, initial=start, unit="img", disable=not progress, desc="features")
    next_index = start
    for record in decoded_images(indexed):
        tic = time.perf_counter()
        pending["features"].append(image_features(extractors, record["image"], scales, combine, flip))
        seconds += time.perf_counter() - tic
        pending["labels"].append(record["label"].numpy())
        pending["ids"].append(record["id"].numpy().decode("utf-8", "replace"))
        index = int(record["index"])
        bar.update(index + 1 - next_index)
        next_index = index + 1
        if len(pending["ids"]) >= chunk_images:
            flush(next_index)
    flush(next_index)
    bar.close()
    if not chunks:
        raise ValueError("no image to describe: the records are empty or none could be decoded")
    features = np.concatenate([c["features"] for c in chunks]).astype(np.float32)
    labels = np.concatenate([c["labels"] for c in chunks])
    ids = np.concatenate([c["ids"] for c in chunks])
    images = len(ids) - done
    return features, labels, ids, {"seconds": round(seconds, 3), "images": images,
                                   "images_per_s": round(images / seconds, 4) if seconds > 0 else None}


def make_extractors(models, layer=DEFAULT_LAYER):
    """FeatureExtractors of `models` (Run objects, run directories or .keras files); at least one."""
    if not models:
        raise ValueError("no model: pass at least one --model")
    return [FeatureExtractor(m if isinstance(m, Run) else load_run(m), layer) for m in models]


def extract_features(models, data, split="train", scales=PAPER_SCALES, combine="average", layer=DEFAULT_LAYER,
                     flip=True, out=None, limit=None, data_options=None, chunk_images=CHUNK_IMAGES, progress=True):
    """`vgg-keras features`: the transfer descriptors (module docstring) of `split` of `data` under `models`.

    models: run directories or .keras files (several are stacked); scales: test scales Q (ints, pixels); combine:
    "average" or "stack" over Q; layer: the dense net's layer to describe with (fc2; block5_pool, fc1, ...).
    With `out`, writes the feature file (`write_features`), resumably. Returns the dict of `load_features`
    (plus "timing": seconds spent in the networks and images/s).
    Raises ValueError for an unknown layer, combine, split or scale, FileNotFoundError for a missing model or data.
    """
    scales = parse_scales(scales if isinstance(scales, str) else ",".join(str(q) for q in scales))
    check_combine(combine)
    if out is not None and not out.endswith(".npz"):
        raise ValueError(f"--out {out!r}: name a .npz file (e.g. features-train.npz)")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be a positive number of images")
    extractors = make_extractors(models, layer)
    source = load_feature_source(data, **(data_options or {}))
    records = source.records(split)
    settings = extraction_settings(extractors, source.spec, split, scales, combine, layer, flip)
    settings["multilabel"] = source.multilabel
    features, labels, ids, timing = extract(extractors, records, scales, combine, flip, settings, out,
                                            chunk_images, limit, progress)
    settings_out = {**settings, "timing": timing}
    if out:
        write_features(out, features, labels, ids, source.class_names, settings_out)
        shutil.rmtree(parts_dir(out), ignore_errors=True)
    return {"features": features, "labels": labels, "ids": ids, "class_names": list(source.class_names),
            "settings": settings_out, "path": out}
