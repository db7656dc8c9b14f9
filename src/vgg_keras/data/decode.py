"""From encoded bytes to RGB pixels without ever failing a pipeline on a bad file.

Real folders hold empty, truncated and corrupt files, TIFFs named .JPEG and the like, and TensorFlow's decode errors
cannot be caught inside a graph. Two defences:

- `bad_file_reason`, a cheap in-graph check (magic bytes, not names; end markers), rejects what a decode would
  fail on or half-decode, before decoding. Rejected files are reported once per process to `SKIPPED`.
- `robust`/`robust_map` (exact, for `check-data`, `prepare`, statistics, evaluation) also run the decode under
  `guarded`, which turns a decode error into a flag, and report it. But a guard is a nested dataset per element,
  and any stateful op in a map function (a guard, a py_function) makes tf.data run it op by op: a training crop
  then costs 30-60% more CPU. So the training pipeline (`checked_batches`) keeps its per-image map stateless: it
  decodes what passed the check unguarded, and does everything stateful once per batch: it reports the rejected
  files, decodes the rare BMP variants TensorFlow cannot (below), and notes the ids it saw; at the end of each pass
  over the data it names the files that a final `ignore_errors` dropped (those that passed the check and still
  failed to decode, or vanished): the ids the source listed (`file_ids`) and the pass did not yield.

What a file shows is what an image viewer shows:
- JPEG: the EXIF Orientation (1-8, APP1 Exif IFD0) is applied in the graph (`images.exif_offset` and
  `exif_orientation`, string ops on the first bytes); a windowed decode maps its window from the displayed image to
  the stored one, decodes, then rotates/flips. A JPEG followed by other data (a motion photo's MP4) is accepted: its
  end marker is searched for in the whole file when it is not among the last TAIL_BYTES.
- BMP: 8-bit palette BMPs are mapped through their palette in the graph (TensorFlow gives the indices). The variants
  TensorFlow cannot decode (1-, 2-, 4- and 16-bit, RLE and BI_BITFIELDS compression, OS/2 headers) and animated
  WebP (which TensorFlow refuses, or crashes on: PILLOW_ONLY) are re-encoded as PNG (first frame) by Pillow
  (`transcode`) in a tf.py_function: in `robust` (per image, where stateful ops are already there), once per batch
  in `checked_batches` (the per-image map stays stateless), and in `vgg-keras predict` before the request. A
  serving graph cannot hold a py_function: `export.checked_decode` refuses these variants with a message that says
  so.
- PNG (8- and 16-bit, palette, grey, alpha), GIF (first frame), WebP and BMP: alpha is dropped (the stored colours
  are used), grey becomes three equal channels.

Decoding is windowed: `decode_window` decodes only the part of a JPEG that a crop needs
(`tf.image.decode_and_crop_jpeg`, at a reduced DCT scale where the window is large); PNG, GIF, BMP and WebP are
decoded whole and sliced.
"""

import functools
import io
import logging
import os
import re
import threading

import numpy as np
import tensorflow as tf

from .images import (bmp_colours, decode_pixels, decode_rgb, displayed_shape, exif_offset, exif_orientation, is_jpeg,
                     jpeg_exif_end, orient, undo_orientation)

log = logging.getLogger("vgg_keras.data")

# Reason codes of `bad_file_reason`; DECODE_FAILED is what a guard reports when TensorFlow raised anyway.
# PILLOW_ONLY is not a fault: such a file is decoded by Pillow where a py_function may run (see the module doc).
(OK, EMPTY, UNSUPPORTED_FORMAT, TRUNCATED_JPEG, TRUNCATED_PNG, DECODE_FAILED, PILLOW_ONLY, PILLOW_FAILED,
 DROPPED) = range(9)
REASONS = {
    EMPTY: "empty or unreadable file",
    UNSUPPORTED_FORMAT: "not a JPEG, PNG, GIF, BMP or WebP image",
    TRUNCATED_JPEG: "truncated JPEG (no end-of-image marker)",
    TRUNCATED_PNG: "truncated PNG (no IEND chunk)",
    DECODE_FAILED: "TensorFlow could not decode it",
    PILLOW_ONLY: "a BMP variant (1/2/4/16-bit, RLE or BI_BITFIELDS) or an animated WebP, which TensorFlow cannot "
                 "decode: convert it to PNG (vgg-keras predict does)",
    PILLOW_FAILED: "neither TensorFlow nor Pillow can decode it (a damaged BMP or animated WebP)",
    DROPPED: "could not be read or decoded (dropped by the training pipeline)",
}

# A JPEG ends with the FF D9 marker, a PNG with its IEND chunk. Where the marker is not among the last TAIL_BYTES
# (data appended: a motion photo's video), the whole file is searched for it (rare, so the cost does not matter).
TAIL_BYTES = 4096


def display_id(file_id):
    """A file id (bytes or str path) as printable text: bytes that are not UTF-8 escaped (caf\\xe9.jpg)."""
    if isinstance(file_id, str):
        file_id = os.fsencode(file_id)
    return file_id.decode("utf-8", "backslashreplace")


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
_MAGIC = 12  # bytes of magic numbers
_HEAD = 36  # bytes read by `bad_file_reason`: the magic numbers, a BMP's header fields, a WebP's VP8X flags
_BMP, _WEBP = 4, 5  # rows of _FORMATS


def _magic_table():
    """Expected head bytes and which of them count, one row per format (numpy constants)."""
    expected, counts = np.zeros((len(_FORMATS), _MAGIC), np.uint8), np.zeros((len(_FORMATS), _MAGIC), bool)
    for row, (pieces, _, _) in enumerate(_FORMATS):
        for offset, magic in pieces:
            expected[row, offset:offset + len(magic)] = list(magic)
            counts[row, offset:offset + len(magic)] = True
    return expected, counts


_EXPECTED, _COUNTS = _magic_table()
_END_MARKERS = [marker for _, marker, _ in _FORMATS]
_TRUNCATED = [reason for _, _, reason in _FORMATS]


def _ends_with(data, length, marker):
    """Whether `data` ends with `marker` (b"" always does), or has it among its last TAIL_BYTES bytes, or (other
    data appended) anywhere after a JPEG's Exif segment (whose thumbnail has an end marker of its own). Searched
    only as far as needed."""
    marker_length = tf.strings.length(marker)
    ending = tf.strings.substr(data, tf.maximum(length - marker_length, 0), marker_length)

    def contains(start):
        return tf.size(tf.strings.split(tf.strings.substr(data, start, length - start), marker)) > 1

    def in_tail():
        return tf.cond(contains(tf.maximum(length - TAIL_BYTES, 0)), lambda: tf.constant(True),
                       lambda: contains(tf.minimum(jpeg_exif_end(data), length)))

    return tf.cond(tf.equal(ending, marker), lambda: tf.constant(True), in_tail)


def _little_endian(head, offset, size):
    """The unsigned little-endian integer (int64) of head[offset:offset + size] (uint8 vector)."""
    return tf.reduce_sum(tf.cast(head[offset:offset + size], tf.int64) * (256 ** np.arange(size)))


def _pillow_only(head, kind):
    """Whether the file whose first _HEAD bytes are `head` and whose _FORMATS row is `kind` is a BMP variant that
    TensorFlow decodes wrongly or not at all (not 8/24/32-bit uncompressed with a Windows header of >= 40 bytes), or
    an animated WebP (VP8X with the animation flag). Arithmetic on the head only: it runs on every image."""
    bpp = _little_endian(head, 28, 2)
    plain_bmp = ((_little_endian(head, 14, 4) >= 40) & tf.equal(_little_endian(head, 30, 4), 0)
                 & (tf.equal(bpp, 8) | tf.equal(bpp, 24) | tf.equal(bpp, 32)))
    animated = tf.reduce_all(tf.equal(head[12:16], list(b"VP8X"))) & tf.equal(head[20] // 2 % 2, 1)
    return (tf.equal(kind, _BMP) & ~plain_bmp) | (tf.equal(kind, _WEBP) & animated)


def bad_file_reason(data):
    """OK (0) when the bytes look decodable (PILLOW_ONLY: by Pillow only), else the reason code (int32 scalar). Few
    ops: it runs on every image."""
    head = tf.io.decode_raw(tf.strings.join([tf.strings.substr(data, 0, _HEAD), b"\0" * _HEAD]), tf.uint8)[:_HEAD]
    head = tf.reshape(head, [_HEAD])
    matches = tf.reduce_all(tf.equal(head[:_MAGIC], _EXPECTED) | ~_COUNTS, axis=1)  # one per format of _FORMATS
    kind = tf.argmax(matches, output_type=tf.int32)
    length = tf.strings.length(data)
    reason = tf.where(_ends_with(data, length, tf.gather(_END_MARKERS, kind)), OK, tf.gather(_TRUNCATED, kind))
    reason = tf.where(tf.reduce_any(matches), reason, UNSUPPORTED_FORMAT)
    reason = tf.where(tf.equal(reason, OK) & _pillow_only(head, kind), PILLOW_ONLY, reason)
    return tf.where(tf.equal(length, 0), EMPTY, reason)


def transcode(data):
    """Python: image bytes re-encoded as PNG (RGB) by Pillow, first frame; unchanged when Pillow cannot decode them.
    For the files TensorFlow cannot decode (PILLOW_ONLY)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "PNG", compress_level=1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return data  # unchanged: still PILLOW_ONLY, which the caller reports as PILLOW_FAILED
    return buffer.getvalue()


def transcoded(data):
    """In a graph: `data` re-encoded as PNG by `transcode` (py_function, stateful) where it is a PILLOW_ONLY."""
    def pillow():
        png = tf.py_function(lambda d: transcode(d.numpy()), [data], Tout=tf.string)
        png.set_shape([])
        return png
    return tf.cond(tf.equal(bad_file_reason(data), PILLOW_ONLY), pillow, lambda: data)


def guarded(fn, fallback):
    """Wrap `fn` (graph code) so that it returns (fn(*args), True), or (fallback, False) where it raises.

    The call runs in a one-element dataset with `ignore_errors`, the only way to catch a kernel error in a graph.
    `fallback` must have the structure and dtypes of fn's result.
    """
    def call(*args):
        attempt = tf.data.Dataset.from_tensors(args).map(lambda *a: (fn(*a), True)).ignore_errors()
        return attempt.concatenate(tf.data.Dataset.from_tensors((fallback, False))).take(1).get_single_element()
    return call


def error_line(message):
    """The useful line of a TensorFlow error message: no node names, op tags or graph-execution preamble."""
    lines = [re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", line).strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(
        ("[[", "Graph execution error", "Detected at", "<stack traces unavailable>", "Stack trace", "File "))]
    return useful[-1] if useful else message.strip()


def describe(reason, data):
    """The reason line of a skipped file (reason code, its bytes as a Python bytes or scalar tensor)."""
    if reason == DROPPED and not len(data if isinstance(data, bytes) else data.numpy()):
        return REASONS[DROPPED] + ": it cannot be read now (it vanished, or permissions)"
    if reason not in (DECODE_FAILED, DROPPED):
        return REASONS[reason]
    try:  # only bad files get here: ask TensorFlow once more, eagerly, for its message
        decode_rgb(data)
    except tf.errors.OpError as err:
        return f"{REASONS[DECODE_FAILED]}: {error_line(err.message)}"
    return REASONS[DECODE_FAILED] + " (a crop window of it failed)"


def _report(file_ids, reasons, datas):
    """Report files (vectors of ids, reason codes, bytes) to SKIPPED from a graph; returns True once done."""
    def record(file_ids, reasons, datas):
        for file_id, reason, data in zip(file_ids.numpy(), reasons.numpy(), datas):
            SKIPPED.add(display_id(file_id), describe(int(reason), data))
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
        data = transcoded(record["image"])
        reason = bad_file_reason(data)
        reason = tf.where(tf.equal(reason, PILLOW_ONLY), PILLOW_FAILED, reason)  # Pillow could not decode it either
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


class _PassTracker:
    """The ids a training pipeline yields in one pass over the data, to name at the pass's end the ones that a final
    `ignore_errors` dropped without a name (`expected_ids`), or to count them (`expected_count` only)."""

    def __init__(self, expected_ids=None, expected_count=None):
        self.expected_ids, self.expected_count = expected_ids, expected_count
        self._seen, self._lock = set(), threading.Lock()

    def see(self, ids):
        with self._lock:
            self._seen.update(ids.numpy().tolist())
        return True

    def end_of_pass(self):
        with self._lock:
            seen, self._seen = self._seen, set()
        if self.expected_ids is not None:
            for file_id in self.expected_ids:
                if file_id not in seen:
                    SKIPPED.add(display_id(file_id), describe(DROPPED, read_file(file_id)))
        elif self.expected_count and len(seen) < self.expected_count:
            log.warning("%d of %d records were not read in this pass (damaged TFRecord shards, or undecodable "
                        "images): run `vgg-keras check-data` to name them", self.expected_count - len(seen),
                        self.expected_count)
        return True


def read_file(file_id):
    """The bytes of a file id that is a path (b"" when it cannot be read, or is not a path)."""
    try:
        with open(file_id, "rb") as f:
            return f.read()
    except (OSError, TypeError, ValueError):
        return b""


def checked_batches(elements, fn, fallback, batch_size, expected_ids=None, expected_count=None):
    """The fast path of the training pipeline: elements (record, *extra) -> prefetching batches (values, labels) of
    fn(record["image"], *extra) over the records that pass `bad_file_reason`, fn unguarded (see the module doc).

    The per-image map holds no stateful op. Per batch: the files the check rejects are reported and dropped (a batch
    with one is that much smaller), PILLOW_ONLY files are re-encoded by Pillow and transformed, and the ids are noted;
    at the end of each pass the ids in `expected_ids` (bytes, the source's `file_ids`) that never came out are
    reported to SKIPPED (or, with `expected_count` only, counted in a warning).
    """
    tracker = _PassTracker(expected_ids, expected_count)

    def transform(record, *extra):
        data = record["image"]
        reason = bad_file_reason(data)
        value = tf.cond(tf.equal(reason, OK), lambda: fn(data, *extra), lambda: fallback)
        pending = tf.where(tf.equal(reason, PILLOW_ONLY), data, "")  # only these bytes travel on
        return value, record["label"], reason, record["id"], pending, extra

    def with_pillow(values, reasons, pending, extra):
        """The PILLOW_ONLY elements of a batch re-encoded as PNG (py_function) and transformed."""
        where = tf.where(tf.equal(reasons, PILLOW_ONLY))
        pngs = tf.map_fn(transcoded, tf.gather_nd(pending, where))
        ok = tf.not_equal(tf.map_fn(bad_file_reason, pngs, fn_output_signature=tf.int32), PILLOW_ONLY)
        new_values = tf.map_fn(lambda args: tf.cond(args[1], lambda: fn(args[0], *args[2]), lambda: fallback),
                               (pngs, ok, tuple(tf.gather_nd(e, where) for e in extra)),
                               fn_output_signature=tf.TensorSpec(fallback.shape, fallback.dtype))
        return (tf.tensor_scatter_nd_update(values, where, new_values),
                tf.tensor_scatter_nd_update(reasons, where, tf.where(ok, OK, PILLOW_FAILED)))

    def finish_batch(values, labels, reasons, ids, pending, extra):
        seen = tf.py_function(tracker.see, [ids], Tout=tf.bool)
        values, reasons = tf.cond(tf.reduce_any(tf.equal(reasons, PILLOW_ONLY)),
                                  lambda: with_pillow(values, reasons, pending, extra), lambda: (values, reasons))
        bad = tf.not_equal(reasons, OK)

        def report_and_drop():
            bad_ids = tf.boolean_mask(ids, bad)
            with tf.control_dependencies([_report(bad_ids, tf.boolean_mask(reasons, bad), tf.zeros_like(bad_ids))]):
                return tf.boolean_mask(values, ~bad), tf.boolean_mask(labels, ~bad)
        with tf.control_dependencies([seen]):
            return tf.cond(tf.reduce_any(bad), report_and_drop, lambda: (tf.identity(values), tf.identity(labels)))

    def end_of_pass(_):
        with tf.control_dependencies([tf.py_function(tracker.end_of_pass, [], Tout=tf.bool)]):
            return tf.zeros([0, *fallback.shape], fallback.dtype), tf.zeros([0], tf.int64)

    batches = (elements.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
               .ignore_errors(log_warning=True)  # what passed the check and failed anyway: named at the pass's end
               .batch(batch_size)
               .map(finish_batch))
    end = tf.data.Dataset.from_tensors(0).map(end_of_pass).filter(lambda values, labels: False)
    return batches.concatenate(end).prefetch(tf.data.AUTOTUNE)


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
    """The window [top, left, height, width] = window_fn(shape [h, w]) of the image as displayed (EXIF orientation
    applied), as uint8 RGB at least `size` pixels on its shorter side where the window has that many (it is to be
    resized to `size` next).

    JPEG: parse the header for the stored size and the Exif orientation, map the window of the displayed image to
    the stored one, decode just that window (at a reduced scale where it is large), then rotate/flip it; other
    formats: decode the whole image (8-bit BMPs through their palette), then slice.
    """
    offset = exif_offset(data)  # >= 0: a JPEG with Exif (a few string ops; no branch of its own)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)[:2]
        return _decode_jpeg_window(data, shape, window_fn(shape), size)

    def oriented_jpeg():
        shape = tf.image.extract_jpeg_shape(data)[:2]
        orientation = exif_orientation(data, offset)
        window = undo_orientation(window_fn(displayed_shape(shape, orientation)), shape, orientation)
        return orient(_decode_jpeg_window(data, shape, window, size), orientation)

    def other():
        image = bmp_colours(data, decode_pixels(data))
        window = window_fn(tf.shape(image)[:2])
        return tf.slice(image, tf.concat([window[:2], [0]], 0), tf.concat([window[2:], [3]], 0))

    kind = tf.where(is_jpeg(data), tf.where(offset >= 0, 2, 1), 0)
    window = tf.switch_case(kind, [other, jpeg, oriented_jpeg])  # one branch op per crop, as before
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
