"""Where images come from: class folders, TFRecord shards written by `vgg-keras prepare`, or a TFDS data set.

Every source has `class_names` (index = label), `records(split, shuffle, seed, shard)` -> tf.data.Dataset of
{"image": encoded bytes, "label": int64, "id": path or key} and `num_examples(split)`; `load_source(spec)` picks the
kind from the spec. Records carry encoded bytes: decoding is the pipeline's job (`decode.py`), so that a bad file
is skipped and reported there rather than failing here. `file_ids(split)` lists the ids a split should yield where
the source knows them without reading (class folders), so that a file the pipeline drops can be named;
`left_out` ({class folder: why}) and `notes` ({file id: why}) say what a folder held that is not used.

Folder rules (`FolderSource`, documented in README.md, "Data"):
- Layout. `classes`: ROOT/<class>/<image>. `splits`: ROOT/train/<class>/<image>, and ROOT/val/<class>/<image> or
  a flat ROOT/val/<image> with a label file. `auto` (the default) takes the split layout when ROOT/train holds
  folders and ROOT holds no folder but train/ and val/; the class layout when ROOT has no train/ folder or train/
  holds images directly (a class named "train", as in PASCAL VOC or CIFAR-100); anything else is ambiguous and
  refused with a message that says how to choose (--layout classes|splits).
- Hidden and tool-made folders and files (names starting with "." or "@", __MACOSX, $RECYCLE.BIN, System Volume
  Information, lost+found, ...) are skipped at every depth. Image files are recognised by extension
  (IMAGE_EXTENSIONS, any case) at any depth of a class folder; links are followed, and no directory is entered
  twice (link cycles) and no file is used twice (several links to one image): the first path in sorted order is
  kept, the others noted. In the split layout a file of val/ that is also in train/ is left out of val/ (no leakage).
- A class folder that holds no image file is left out, with a warning naming it: it gets no label, and the labels of
  the others do not shift.
- File names are handled as bytes (any name the OS can open, UTF-8 or not); ids in reports are the path with
  undecodable bytes escaped (caf\\xe9.jpg).
- Without val/, a seeded split stratified by class keeps `val_fraction` of each class for validation.
- A flat val/ (ILSVRC-2012 validation images) takes its labels from `val_labels` or the first label file found in
  val/, ROOT or up to three folders above ROOT (LOC_val_solution.csv of the Kaggle ImageNet localisation data:
  ImageId,PredictionString with the wnid first; or a CSV of file,label, header optional); labels are training class
  names (wnids). Images without a label are noted and not used.
"""

import csv
import logging
import os
import pathlib

import numpy as np
import tensorflow as tf

from .decode import SKIPPED, display_id

log = logging.getLogger("vgg_keras.data")

SPLITS = ("train", "val")
LAYOUTS = ("auto", "classes", "splits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")  # compared case-insensitively
# Folders that operating systems, zip tools and NAS boxes leave behind (any name starting with "." or "@" too).
JUNK_NAMES = frozenset({"__macosx", "$recycle.bin", "recycler", "system volume information", "lost+found",
                        "__pycache__", ".trashes", "thumbs.db", "desktop.ini"})
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.csv", "val.csv")  # looked for by a flat val/, in this order
SHUFFLE_BUFFER = 2048  # records (encoded bytes) held for shuffling where whole-split shuffles are not possible
TFDS_PREFIX = "tfds:"
_BYTE_EXTENSIONS = tuple(ext.encode() for ext in IMAGE_EXTENSIONS)


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def require_examples(source, split):
    """Raise ValueError naming the source's folder (or data set) and the fix when `split` holds no image."""
    check_split(split)
    if source.num_examples(split) == 0:
        where = getattr(source, "split_dir", lambda s: None)(split) or source.spec
        raise ValueError(f"--data {source.spec}: the {split} split holds no image ({where}). "
                         + ("Give it some: a val/ folder of class folders (or a flat val/ with a label file), or "
                            "--val-fraction > 0 to hold out part of the training images."
                            if split == "val" else "Put images in the class folders."))


def expected_records(source, split):
    """{"expected_ids": the ids the split yields (bytes) or None, "expected_count": its size or None}: what
    `decode.checked_batches` checks a pass against, so that no file is lost without a name."""
    if getattr(source, "count", 1) > 1:  # one worker's share (distribute.WorkerShare): the others read the rest
        return {"expected_ids": None, "expected_count": None}
    source = getattr(source, "source", source)  # a WorkerShare of a single pipeline reads the whole split
    ids = source.file_ids(split) if hasattr(source, "file_ids") else None
    return {"expected_ids": ids, "expected_count": None if ids is not None else source.num_examples(split)}


def is_junk(name):
    """Whether a file or folder name (str or bytes) is hidden or made by a tool, never data."""
    name = os.fsdecode(name)
    return name.startswith((".", "@", "~$")) or name.lower() in JUNK_NAMES


def _is_image_name(name):
    return name.lower().endswith(_BYTE_EXTENSIONS)


def _entries(directory):
    """The visible entries of a directory (bytes path), sorted by name; none where it cannot be listed."""
    try:
        with os.scandir(directory) as it:
            return sorted((entry for entry in it if not is_junk(entry.name)), key=lambda entry: entry.name)
    except OSError as err:
        log.warning("cannot list %s: %s", display_id(directory), err.strerror)
        return []


def _is_dir(entry):
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


class _Walker:
    """Finds image files under folders, following links, entering each directory once and keeping each file once."""

    def __init__(self):
        self.visited_dirs, self.files = set(), {}  # (dev, inode) -> first path
        self.notes = {}  # {display id: why not used}

    def images(self, directory):
        """Paths (bytes) of the image files under `directory`, depth first in sorted order."""
        try:
            info = os.stat(directory)
        except OSError:
            return []
        if (info.st_dev, info.st_ino) in self.visited_dirs:
            return []  # a link back to a folder already scanned (a cycle, or two links to one folder)
        self.visited_dirs.add((info.st_dev, info.st_ino))
        found = []
        for entry in _entries(directory):
            if _is_dir(entry):
                found += self.images(entry.path)
            elif _is_image_name(entry.name):
                key = self._file_key(entry, info.st_dev)
                if key is None:
                    SKIPPED.add(display_id(entry.path), "unreadable file (permissions, or a broken link)")
                elif key in self.files:
                    self.notes[display_id(entry.path)] = f"the same file as {display_id(self.files[key])}"
                else:
                    self.files[key] = entry.path
                    found.append(entry.path)
        return found

    @staticmethod
    def _file_key(entry, directory_dev):
        """(device, inode) of the file a directory entry names (links followed), or None when it cannot be read."""
        try:
            if entry.is_symlink():
                info = os.stat(entry.path)
                key = (info.st_dev, info.st_ino)
            else:
                key = (directory_dev, entry.inode())
        except OSError:
            return None
        return key if os.access(entry.path, os.R_OK) else None


def _class_dirs(directory):
    return [entry for entry in _entries(directory) if _is_dir(entry)]


def _holds_images(directory):
    """Whether `directory` holds image files directly (not in subfolders)."""
    return any(_is_image_name(entry.name) and not _is_dir(entry) for entry in _entries(directory))


def check_shard(shard, shuffle, seed):
    """`shard` = (index, count): this input pipeline reads the index-th of `count` disjoint shares of the split
    (one per worker, see distribute.WorkerShare); None reads it all. A shuffled split is partitioned after a
    shuffle that every worker must draw alike, hence the seed."""
    if shard is None:
        return None
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: expected (index, count) with 0 <= index < count")
    if shuffle and seed is None:
        raise ValueError("a shuffled split is sharded after a shuffle all workers draw alike: give it a seed")
    return int(index), int(count)


class FolderSource:
    """Class folders: ROOT/<class>/<image>, or ROOT/train/<class>/... and ROOT/val/ (see the module doc for the
    rules). Raises ValueError naming the folder when the layout is ambiguous, no class folder holds an image, or a
    flat val/ has no usable label file."""

    def __init__(self, root, val_fraction=0.1, seed=0, layout="auto", val_labels=None):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
        if layout not in LAYOUTS:
            raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        self.root = pathlib.Path(root)
        self.spec = str(root)
        self.layout = self._layout(layout)
        self.left_out, self.notes = {}, {}
        root_bytes = os.fsencode(self.root)
        train_dir = os.path.join(root_bytes, b"train") if self.layout == "splits" else root_bytes
        self._dirs = {"train": train_dir, "val": os.path.join(root_bytes, b"val")}
        walker = _Walker()
        classes = {}
        for entry in _class_dirs(train_dir):
            paths = walker.images(entry.path)
            if paths:
                classes[os.fsdecode(entry.name)] = paths
            else:
                self.left_out[display_id(entry.path)] = "no image file in it"
        if not classes and not self.left_out:
            raise ValueError(f"--data {root}: no class folders in {display_id(train_dir)} "
                             f"(expected {display_id(train_dir)}/<class>/<image>)")
        if not classes:
            raise ValueError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                             f"of {display_id(train_dir)}")
        for folder, why in self.left_out.items():
            log.warning("class folder %s left out: %s", folder, why)
        self.class_names = sorted(classes)
        train = ([path for name in self.class_names for path in classes[name]],
                 [label for label, name in enumerate(self.class_names) for _ in classes[name]])
        if self.layout == "splits" and os.path.isdir(self._dirs["val"]):
            self._files = {"train": train, "val": self._scan_val(walker, val_labels)}
        else:
            self._files = _stratified_split(train, val_fraction, seed)
        self.notes.update(walker.notes)

    def _layout(self, layout):
        """'classes' or 'splits' for --layout `layout` (see the module doc)."""
        if layout != "auto":
            if layout == "splits" and not (self.root / "train").is_dir():
                raise ValueError(f"--layout splits: {self.root} has no train/ folder")
            return layout
        train = self.root / "train"
        if not train.is_dir() or _holds_images(os.fsencode(train)) or not _class_dirs(os.fsencode(train)):
            return "classes"
        others = [os.fsdecode(entry.name) for entry in _class_dirs(os.fsencode(self.root))
                  if entry.name not in (b"train", b"val")]
        if not others:
            return "splits"
        raise ValueError(
            f"--data {self.root}: ambiguous layout: train/ holds folders (the split layout train/<class>/, val/) "
            f"but {self.root} also holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which would "
            "be class folders. Choose: --layout splits (use train/ and val/ only) or --layout classes (every "
            "folder, train/ included, is a class)")

    def _scan_val(self, walker, val_labels):
        """(paths, labels) of val/: class folders, or a flat folder of images with a label file."""
        val_dir, known = self._dirs["val"], {name: label for label, name in enumerate(self.class_names)}
        paths, labels = [], []
        for entry in _class_dirs(val_dir):
            name = os.fsdecode(entry.name)
            if name not in known and display_id(os.path.join(self._dirs["train"], entry.name)) not in self.left_out:
                raise ValueError(f"--data {self.root}: class folder {display_id(entry.path)} has no counterpart in "
                                 "the training classes")
            found = walker.images(entry.path)
            if name not in known:
                self.left_out[display_id(entry.path)] = "its training class folder holds no image"
                continue
            paths += found
            labels += [known[name]] * len(found)
        flat = [entry for entry in _entries(val_dir) if not _is_dir(entry) and _is_image_name(entry.name)]
        if flat:
            by_name, dev = self._val_labels(val_labels, len(flat)), os.stat(val_dir).st_dev
            for entry in flat:
                name = os.fsdecode(entry.name)
                wnid = by_name.get(name, by_name.get(os.path.splitext(name)[0]))
                key = walker._file_key(entry, dev)
                if wnid is None:
                    walker.notes[display_id(entry.path)] = "no label for it in the label file"
                elif key in walker.files:  # also in train/ (or reached twice): never in both splits
                    walker.notes[display_id(entry.path)] = f"the same file as {display_id(walker.files[key])}"
                elif key is not None:
                    walker.files[key] = entry.path
                    paths.append(entry.path)
                    labels.append(known[wnid])
        return paths, labels

    def _val_labels(self, val_labels, count):
        """{file name or stem: class name} from the label file of a flat val/ holding `count` images."""
        val_dir = display_id(self._dirs["val"])
        if val_labels is None:
            candidates = [pathlib.Path(val_dir), self.root, *list(self.root.resolve().parents)[:3]]
            found = [folder / name for name in LABEL_FILES for folder in candidates if (folder / name).is_file()]
            if not found:
                raise ValueError(
                    f"--data {self.root}: {val_dir} holds {count} images directly and no label file "
                    f"({', '.join(LABEL_FILES)}) was found in it, in {self.root} or above. Give one with "
                    "--val-labels FILE (CSV rows: file,class name; or Kaggle's LOC_val_solution.csv), or sort the "
                    f"images into {val_dir}/<class>/")
            val_labels = found[0]
        labels = read_label_file(val_labels)
        unknown = sorted({wnid for wnid in labels.values()} - set(self.class_names))
        if unknown:
            raise ValueError(f"--val-labels {val_labels}: {len(unknown)} labels are not training class folders "
                             f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); labels must be the "
                             "class folder names (wnids for ImageNet)")
        log.info("labels of %s from %s", val_dir, val_labels)
        return labels

    def split_dir(self, split):
        """The folder a split comes from (a seeded split: the training folders)."""
        return display_id(self._dirs["val" if split == "val" and self.layout == "splits" else "train"])

    def num_examples(self, split):
        check_split(split)
        return len(self._files[split][0])

    def file_ids(self, split):
        """The ids (paths, bytes) the split's records carry, in sorted order."""
        check_split(split)
        return list(self._files[split][0])

    def records(self, split, shuffle=False, seed=None, shard=None):
        check_split(split)
        shard = check_shard(shard, shuffle, seed)
        paths, labels = self._files[split]
        files = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
        if shuffle:  # shuffle names, not bytes: a whole-split shuffle costs almost nothing
            files = files.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
        if shard:  # every n-th name of the permutation all workers drew alike: only this share is read
            files = files.shard(shard[1], shard[0])
        # Files that cannot be read were left out by the scan; one that vanishes later fails the read, and the
        # pipeline names it (decode.checked_batches, decode.robust_map).
        return files.map(lambda path, label: {"image": tf.io.read_file(path), "label": label, "id": path},
                         num_parallel_calls=tf.data.AUTOTUNE)


def read_label_file(path):
    """{image file name or stem: class name} from a validation label file: Kaggle's LOC_val_solution.csv
    (ImageId,PredictionString: "wnid x0 y0 x1 y1 wnid ...", the first wnid is the label), or a CSV of file,label
    rows (a first row starting with ImageId, file, filename, image, name, path or id is a header). Raises
    ValueError naming the file and row of a malformed row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(field.strip() for field in row)]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--val-labels {path}: cannot read it ({err})") from None
    header = bool(rows) and rows[0][0].strip().lower() in ("imageid", "file", "filename", "image", "name", "path", "id")
    rows = rows[1:] if header else rows
    labels = {}
    for number, row in enumerate(rows, start=1 + header):
        if len(row) < 2 or not row[1].split():
            raise ValueError(f"--val-labels {path}: row {number} {row!r}: expected file,label")
        labels[os.path.basename(row[0].strip())] = row[1].split()[0]
    return labels


def _stratified_split(files, val_fraction, seed):
    """{"train": (paths, labels), "val": (paths, labels)}: round(val_fraction * n) random files of each class to val."""
    paths, labels = np.array(files[0], dtype=object), np.array(files[1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(paths), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_val[rng.permutation(members)[:int(round(val_fraction * len(members)))]] = True
    return {split: (list(paths[mask]), list(labels[mask])) for split, mask in (("train", ~is_val), ("val", is_val))}


class TFDSSource:
    """A TensorFlow Datasets data set, 'tfds:NAME[/CONFIG]', prepared on first use (imagenet2012 from the ILSVRC tars
    in `manual_dir`). Images are read as encoded bytes (SkipDecoding). Our "val" is TFDS's "validation" split, else
    its "test" split, else the last `val_fraction` of "train"."""

    def __init__(self, name, data_dir=None, manual_dir=None, val_fraction=0.1):
        import tensorflow_datasets as tfds

        self.name = name
        self.spec = TFDS_PREFIX + name
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
            self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        except (AssertionError, OSError, ValueError, tfds.core.registered.DatasetNotFoundError) as err:
            raise ValueError(f"--data {TFDS_PREFIX}{name}: cannot prepare it with TFDS: {err}") from err
        features = dict(self.builder.info.features.items())
        self._image_key, self._label_key = self.builder.info.supervised_keys or ("image", "label")
        if not isinstance(features.get(self._image_key), tfds.features.Image) or not isinstance(
                features.get(self._label_key), tfds.features.ClassLabel):
            raise ValueError(f"--data {TFDS_PREFIX}{name}: not an image classification data set "
                             f"(needs an Image feature {self._image_key!r} and a ClassLabel {self._label_key!r})")
        self.class_names = list(features[self._label_key].names)
        self._splits = self._split_names(val_fraction)

    def _split_names(self, val_fraction):
        known = set(self.builder.info.splits)
        if not known or "validation" in known:  # an unknown split list (mocked data) is taken to have one
            return {"train": "train", "val": "validation"}
        if "test" in known:
            return {"train": "train", "val": "test"}
        percent = int(round(100 * val_fraction))
        return {"train": f"train[:{100 - percent}%]", "val": f"train[{100 - percent}%:]"}

    def num_examples(self, split):
        check_split(split)
        try:
            return int(self.builder.info.splits[self._splits[split]].num_examples)
        except (KeyError, ValueError, TypeError):
            return None

    def records(self, split, shuffle=False, seed=None, shard=None):
        import tensorflow_datasets as tfds

        check_split(split)
        shard = check_shard(shard, shuffle, seed)
        name = self._splits[split]
        if shard:  # a fixed contiguous 1/count of the records, of which TFDS reads only the files that hold it
            name = tfds.even_splits(name, n=shard[1])[shard[0]]
        ds = self.builder.as_dataset(
            split=name, shuffle_files=shuffle,
            decoders={self._image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True))
        if shuffle:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        return ds.map(self._record, num_parallel_calls=tf.data.AUTOTUNE)

    def _record(self, example):
        return {"image": example[self._image_key],
                "label": tf.cast(example[self._label_key], tf.int64),
                "id": example["file_name"] if "file_name" in example else example["tfds_id"]}


def load_source(spec, data_dir=None, manual_dir=None, val_fraction=0.1, seed=0, layout="auto", val_labels=None):
    """The source named by `spec` (the --data flag): "tfds:NAME[/CONFIG]", a directory written by
    `vgg-keras prepare`, or a class-folder directory (`layout`, `val_labels`: see FolderSource)."""
    from .tfrecords import TFRecordSource, is_tfrecord_dir  # here: tfrecords imports this module

    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        return TFDSSource(spec[len(TFDS_PREFIX):], data_dir=data_dir, manual_dir=manual_dir,
                          val_fraction=val_fraction)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--data {spec}: no such directory (nor a tfds:NAME data set)")
    if is_tfrecord_dir(spec):
        return TFRecordSource(spec)
    return FolderSource(spec, val_fraction=val_fraction, seed=seed, layout=layout, val_labels=val_labels)
