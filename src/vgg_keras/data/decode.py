"""From encoded bytes to RGB pixels without ever failing a pipeline on a bad file.

Real folders hold empty, truncated and corrupt files, TIFFs named .JPEG and the like, and TensorFlow's decode errors
cannot be caught inside a graph. Two defences:

- `bad_file_reason`, a cheap in-graph check (magic bytes, not names; end markers), rejects what a decode would
  fail on or half-decode, before decoding. Rejected files are reported once per process to `SKIPPED`.
- `robust`/`robust_map` (exact, for `check-data`, `prepare`, statistics, evaluation) also run the decode under
  `guarded`, which turns a decode error into a flag, and report it. But a guard is a nested dataset per element,
  and any stateful op in a map function (a guard, a py_function) makes tf.data run it op by op: a training crop
  then costs 30-60% more CPU. So the training pipeline (`checked_batches`) keeps its map stateless: it decodes what
  passed the check unguarded, reports the rejected files per batch, and leaves the rare file that passes the check
  and still fails to decode to a final `ignore_errors`, which logs TensorFlow's error without the path
  (`vgg-keras check-data` names such files).

Decoding is windowed: `decode_window` decodes only the part of a JPEG that a crop needs
(`tf.image.decode_and_crop_jpeg`, at a reduced DCT scale where the window is large); PNG, GIF, BMP and WebP are
decoded whole and sliced.
"""

import functools
import logging
import threading

import numpy as np
import tensorflow as tf

from .images import decode_rgb

log = logging.getLogger("vgg_keras.data")

# Reason codes of `bad_file_reason`; DECODE_FAILED is what a guard reports when TensorFlow raised anyway.
OK, EMPTY, UNSUPPORTED_FORMAT, TRUNCATED_JPEG, TRUNCATED_PNG, DECODE_FAILED = range(6)
REASONS = {
    EMPTY: "empty or unreadable file",
    UNSUPPORTED_FORMAT: "not a JPEG, PNG, GIF, BMP or WebP image",
    TRUNCATED_JPEG: "truncated JPEG (no end-of-image marker)",
    TRUNCATED_PNG: "truncated PNG (no IEND chunk)",
    DECODE_FAILED: "TensorFlow could not decode it",
}

# A JPEG ends with the FF D9 marker, a PNG with its IEND chunk; tolerate this much data after them (some cameras
# append some).
TAIL_BYTES = 4096


class SkippedFiles:
    """Process-wide record of the files skipped as undecodable: each is logged once, however many epochs see it."""

    def __init__(self):
        self._reasons = {}
        self._lock = threading.Lock()

    def add(self, file_id, reason):
        with self._lock:
            if file_id in self._reasons:
                return False
            self._reasons[file_id] = reason
        log.warning("skipping %s: %s", file_id, reason)
        return True

    def reasons(self):
        """{file id: reason} of every file skipped so far."""
        with self._lock:
            return dict(self._reasons)

    def clear(self):
        with self._lock:
            self._reasons.clear()


SKIPPED = SkippedFiles()


# The formats TensorFlow decodes: magic numbers as (offset, bytes) pieces that must all match, and for formats whose
# files end with a marker, the marker and the reason given when it is missing.
_FORMATS = [
    ([(0, b"\xff\xd8\xff")], b"\xff\xd9", TRUNCATED_JPEG),
    ([(0, b"\x89PNG\r\n\x1a\n")], b"IEND\xaeB`\x82", TRUNCATED_PNG),
    ([(0, b"GIF87a")], b"", OK),
    ([(0, b"GIF89a")], b"", OK),
    ([(0, b"BM")], b"", OK),
    ([(0, b"RIFF"), (8, b"WEBP")], b"", OK),
]
_HEAD = 12


def _magic_table():
    """Expected head bytes and which of them count, one row per format (numpy constants)."""
    expected, counts = np.zeros((len(_FORMATS), _HEAD), np.uint8), np.zeros((len(_FORMATS), _HEAD), bool)
    for row, (pieces, _, _) in enumerate(_FORMATS):
        for offset, magic in pieces:
            expected[row, offset:offset + len(magic)] = list(magic)
            counts[row, offset:offset + len(magic)] = True
    return expected, counts


_EXPECTED, _COUNTS = _magic_table()
_END_MARKERS = [marker for _, marker, _ in _FORMATS]
_TRUNCATED = [reason for _, _, reason in _FORMATS]


def _ends_with(data, length, marker):
    """Whether `data` ends with `marker` (b"" always does), or has it among its last TAIL_BYTES bytes (searched
    only when it does not end with it)."""
    marker_length = tf.strings.length(marker)
    ending = tf.strings.substr(data, tf.maximum(length - marker_length, 0), marker_length)

    def in_tail():
        tail = tf.strings.substr(data, tf.maximum(length - TAIL_BYTES, 0), TAIL_BYTES)
        return tf.size(tf.strings.split(tail, marker)) > 1

    return tf.cond(tf.equal(ending, marker), lambda: tf.constant(True), in_tail)


def is_jpeg(data):
    return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def bad_file_reason(data):
    """OK (0) when the bytes look decodable, else the reason code (int32 scalar). Few ops: it runs on every image."""
    head = tf.io.decode_raw(tf.strings.join([tf.strings.substr(data, 0, _HEAD), b"\0" * _HEAD]), tf.uint8)[:_HEAD]
    matches = tf.reduce_all(tf.equal(head, _EXPECTED) | ~_COUNTS, axis=1)  # one per format of _FORMATS
    kind = tf.argmax(matches, output_type=tf.int32)
    length = tf.strings.length(data)
    reason = tf.where(_ends_with(data, length, tf.gather(_END_MARKERS, kind)), OK, tf.gather(_TRUNCATED, kind))
    reason = tf.where(tf.reduce_any(matches), reason, UNSUPPORTED_FORMAT)
    return tf.where(tf.equal(length, 0), EMPTY, reason)


def guarded(fn, fallback):
    """Wrap `fn` (graph code) so that it returns (fn(*args), True), or (fallback, False) where it raises.

    The call runs in a one-element dataset with `ignore_errors`, the only way to catch a kernel error in a graph.
    `fallback` must have the structure and dtypes of fn's result.
    """
    def call(*args):
        attempt = tf.data.Dataset.from_tensors(args).map(lambda *a: (fn(*a), True)).ignore_errors()
        return attempt.concatenate(tf.data.Dataset.from_tensors((fallback, False))).take(1).get_single_element()
    return call


def _describe(reason, data):
    if reason != DECODE_FAILED:
        return REASONS[reason]
    try:  # only bad files get here: ask TensorFlow once more, eagerly, for its message
        decode_rgb(data)
    except tf.errors.OpError as err:
        return f"{REASONS[DECODE_FAILED]}: {err.message.strip().splitlines()[-1]}"
    return REASONS[DECODE_FAILED] + " (a crop window of it failed)"


def _report(file_ids, reasons, datas):
    """Report files (vectors of ids, reason codes, bytes) to SKIPPED from a graph; returns True once done."""
    def record(file_ids, reasons, datas):
        for file_id, reason, data in zip(file_ids.numpy(), reasons.numpy(), datas):
            SKIPPED.add(file_id.decode("utf-8", "replace"), _describe(int(reason), data))
        return True
    done = tf.py_function(record, [file_ids, reasons, datas], Tout=tf.bool)
    done.set_shape([])
    return done


def robust(fn, fallback):
    """`fn(data, *extra)` on a record's bytes, as (value, ok), for a map function: never raises on a bad file.

    Files that `bad_file_reason` rejects are not decoded; these and the ones on which fn raises are reported to
    SKIPPED (by the record's id) and give (fallback, False). `fallback` has the structure and dtypes of fn's result.
    """
    attempt = guarded(fn, fallback)

    def apply(record, *extra):
        data = record["image"]
        reason = bad_file_reason(data)
        value, ok = tf.cond(tf.equal(reason, OK), lambda: attempt(data, *extra), lambda: (fallback, tf.constant(False)))
        reason = tf.where(tf.equal(reason, OK), DECODE_FAILED, reason)
        ok = tf.cond(ok, lambda: tf.constant(True),
                     lambda: tf.logical_not(_report(record["id"][None], reason[None], data[None])))
        return value, ok
    return apply


def robust_map(elements, fn, fallback):
    """`robust` over a dataset: elements (record, *extra) -> (value, record, ok). An element whose record could not
    even be read (a file that vanished) is dropped, with TensorFlow's warning."""
    apply = robust(fn, fallback)

    def value_record_ok(record, *extra):
        value, ok = apply(record, *extra)
        return value, record, ok

    return elements.map(value_record_ok, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)


def checked_batches(elements, fn, fallback, batch_size):
    """The fast path of the training pipeline: elements (record, *extra) -> prefetching batches (values, labels) of
    fn(record["image"], *extra) over the records that pass `bad_file_reason`, fn unguarded (see the module doc).

    The map holds no stateful op; the files the check rejects are reported and dropped per batch, so a batch with one
    is that much smaller.
    """
    def transform(record, *extra):
        reason = bad_file_reason(record["image"])
        value = tf.cond(tf.equal(reason, OK), lambda: fn(record["image"], *extra), lambda: fallback)
        return value, record["label"], reason, record["id"]

    def drop_bad(values, labels, reasons, ids):
        bad = tf.not_equal(reasons, OK)

        def report_and_drop():
            bad_ids = tf.boolean_mask(ids, bad)
            with tf.control_dependencies([_report(bad_ids, tf.boolean_mask(reasons, bad), tf.zeros_like(bad_ids))]):
                return tf.boolean_mask(values, ~bad), tf.boolean_mask(labels, ~bad)
        return tf.cond(tf.reduce_any(bad), report_and_drop, lambda: (values, labels))

    return (elements.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors(log_warning=True)  # last line of defence: what passed the check and failed anyway
            .batch(batch_size)
            .map(drop_bad)
            .prefetch(tf.data.AUTOTUNE))


def _decode_jpeg_window(data, shape, window, size):
    """The window of a JPEG of `shape` [h, w], decoded at 1/2, 1/4 or 1/8 scale where it stays at least `size` pixels
    on its shorter side (libjpeg shrinks in the DCT domain: cheaper than a full decode, and without aliasing)."""
    level = tf.reduce_sum(tf.cast(tf.reduce_min(window[2:]) // size >= tf.constant([2, 4, 8]), tf.int32))
    ratio = tf.bitwise.left_shift(1, level)
    # libjpeg's reduced image is ceil(h / ratio) x ceil(w / ratio); the crop window is given at that scale, rounded
    # to its pixels (at most half a reduced pixel off).
    reduced_shape = (shape + ratio - 1) // ratio
    start = tf.minimum((window[:2] + ratio // 2) // ratio, reduced_shape - 1)
    reduced = tf.concat([start, tf.clip_by_value((window[2:] + ratio // 2) // ratio, 1, reduced_shape - start)], 0)
    return tf.switch_case(level, [functools.partial(tf.image.decode_and_crop_jpeg, data, reduced, channels=3,
                                                    ratio=ratio_value) for ratio_value in (1, 2, 4, 8)])


def decode_window(data, window_fn, size):
    """The window [top, left, height, width] = window_fn(shape [h, w]) of the image, as uint8 RGB at least `size`
    pixels on its shorter side where the window has that many (it is to be resized to `size` next).

    JPEG: parse the header for the image size and decode just the window, at a reduced scale where it is large;
    other formats: decode the whole image, then slice.
    """
    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)[:2]
        return _decode_jpeg_window(data, shape, window_fn(shape), size)

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        window = window_fn(tf.shape(image)[:2])
        return tf.slice(image, tf.concat([window[:2], [0]], 0), tf.concat([window[2:], [3]], 0))

    window = tf.cond(is_jpeg(data), jpeg, other)
    window.set_shape([None, None, 3])
    return window


def _no_image():
    return tf.zeros([0, 0, 3], tf.float32)


def decode_record(record):
    """A record's image as float32 [h, w, 3] RGB 0-255 (graph-safe).

    An undecodable file gives a 0x0x3 image (and is reported once to SKIPPED): keep `tf.size(image) > 0`, or use
    `decode_records`, which does that.
    """
    image, _ = robust(decode_rgb, _no_image())(record)
    return image


def decode_records(records):
    """A dataset of records -> the same dicts with "image" decoded (float32 RGB 0-255), undecodable files skipped."""
    return (robust_map(records, decode_rgb, _no_image())
            .filter(lambda image, record, ok: ok)
            .map(lambda image, record, ok: {**record, "image": image})
            .ignore_errors(log_warning=True))
