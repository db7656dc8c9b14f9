"""Image primitives shared by training, evaluation and export (TensorFlow ops, graph-safe).

An image here is a float32 [h, w, 3] RGB tensor with values 0-255, before mean subtraction. `decode_rgb` is the
one whole-image decoder (evaluation, statistics, `prepare`, the serving graph); `decode.decode_window` is its
windowed twin for training crops. Both show a file as an image viewer does: EXIF orientation applied (JPEG),
palette BMPs through their palette (see data/decode.py for the BMP variants only Pillow decodes).
"""

import numpy as np
import tensorflow as tf

# EXIF Orientation (TIFF tag 0x0112) -> (transpose, reverse rows, reverse columns): displayed = flips(transpose(stored))
_ORIENTATIONS = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0],
                          [1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]], bool)  # row 0: unused
_IFD_ENTRIES = 32  # IFD0 entries read (sorted by tag: Orientation, 0x0112, comes early)


def substr(data, offset, count):
    """data[offset:offset + count] (a scalar string), b"" past the end (tf.strings.substr raises there)."""
    return tf.strings.substr(data, tf.minimum(offset, tf.strings.length(data)), count)


def _bytes_at(data, offset, count):
    """uint8 [count] of data[offset:offset + count], zero-padded past the end."""
    piece = tf.strings.join([substr(data, offset, count), b"\0" * count])
    return tf.reshape(tf.io.decode_raw(piece, tf.uint8)[:count], [count])  # a static shape


def u16le(data, offset):
    raw = tf.cast(_bytes_at(data, offset, 2), tf.int32)
    return raw[0] + 256 * raw[1]


def u32le(data, offset):
    raw = tf.cast(_bytes_at(data, offset, 4), tf.int64)
    return tf.cast(raw[0] + 256 * (raw[1] + 256 * (raw[2] + 256 * raw[3])), tf.int32)


def is_jpeg(data):
    return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def is_bmp(data):
    return tf.equal(tf.strings.substr(data, 0, 2), b"BM")


def exif_offset(data):
    """Offset (int32) of the "Exif\\0\\0" header of a JPEG's APP1 segment, or -1: the first segment after SOI, or the
    one after JFIF's APP0 (where cameras and phones write it). Few ops, no search, no branch: it runs on every crop."""
    first = tf.cast(_bytes_at(data, 2, 4), tf.int32)  # marker, length of the first segment
    second_at = 4 + 256 * first[2] + first[3]
    in_first = tf.equal(first[1], 0xE1) & tf.equal(substr(data, 6, 6), b"Exif\0\0")
    in_second = (tf.equal(first[1], 0xE0) & tf.equal(substr(data, second_at, 2), b"\xff\xe1")
                 & tf.equal(substr(data, second_at + 4, 6), b"Exif\0\0"))
    return tf.where(in_first, 6, tf.where(in_second, second_at + 4, -1))


def jpeg_exif_end(data):
    """Offset (int32) just past a JPEG's Exif APP1 segment (0 without one)."""
    offset = exif_offset(data)
    length = tf.cast(_bytes_at(data, tf.maximum(offset - 2, 0), 2), tf.int32)
    return tf.where(offset >= 0, offset - 2 + 256 * length[0] + length[1], 0)


def jpeg_orientation(data):
    """The EXIF Orientation (int32, 1-8) of JPEG bytes: IFD0 tag 0x0112 of the APP1 Exif segment (TIFF, either byte
    order); 1 without one or when it is out of range. String ops on the first bytes only, stateless: cheap enough
    for every training crop (JEITA CP-3451, section 4.6.4)."""
    offset = exif_offset(data)
    return tf.cond(offset >= 0, lambda: exif_orientation(data, offset), lambda: tf.constant(1))


def exif_orientation(data, offset):
    """The Orientation (int32, 1-8; 1 when absent or out of range) of the Exif header at `offset` (exif_offset >= 0)."""
    tiff = offset + 6
    big_endian = tf.equal(substr(data, tiff, 2), b"MM")

    def number(raw):  # uint8 [..., n] -> int32 in the file's byte order
        raw = tf.cast(raw, tf.int64)
        raw = tf.where(big_endian, tf.reverse(raw, [-1]), raw)
        weights = tf.constant([1, 256, 65536, 16777216], tf.int64)[:raw.shape[-1]]
        return tf.cast(tf.reduce_sum(raw * weights, -1), tf.int32)

    ifd = tiff + number(_bytes_at(data, tiff + 4, 4))
    count = number(_bytes_at(data, ifd, 2))
    entries = tf.reshape(_bytes_at(data, ifd + 2, 12 * _IFD_ENTRIES), [_IFD_ENTRIES, 12])
    is_orientation = tf.equal(number(entries[:, :2]), 0x0112) & (tf.range(_IFD_ENTRIES) < count)
    value = tf.reduce_max(tf.where(is_orientation, number(entries[:, 8:10]), 0))
    return tf.where((value >= 1) & (value <= 8), value, 1)


def orient(image, orientation):
    """The stored image [h, w, c] as displayed under EXIF `orientation` (1-8): transpose, then flips. Two ops and no
    branch (an identity transpose and an empty reverse pass the image through)."""
    transpose, rows, columns = tf.unstack(tf.gather(_ORIENTATIONS, orientation))
    shown = tf.transpose(image, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
    shown = tf.reverse(shown, tf.boolean_mask([0, 1], tf.stack([rows, columns])))
    shown.set_shape([None, None, image.shape[-1]])  # a dynamic permutation loses the rank
    return shown


def displayed_shape(shape, orientation):
    """[h, w] of the displayed image of a stored image of `shape` [h, w]."""
    return tf.where(tf.gather(_ORIENTATIONS, orientation)[0], tf.reverse(shape, [0]), shape)


def undo_orientation(window, shape, orientation):
    """The window [top, left, height, width] of the stored image of `shape` [h, w] that `orient` turns into
    `window` of the displayed image."""
    transpose, rows, columns = tf.unstack(tf.gather(_ORIENTATIONS, orientation))
    shown = displayed_shape(shape, orientation)
    top = tf.where(rows, shown[0] - window[0] - window[2], window[0])
    left = tf.where(columns, shown[1] - window[1] - window[3], window[1])
    return tf.where(transpose, tf.stack([left, top, window[3], window[2]]), tf.stack([top, left, window[2], window[3]]))


def bmp_colours(data, image):
    """`image` (uint8 [h, w, 3], as tf.io.decode_image gives it) in the colours of the palette of an uncompressed
    8-bit BMP (TensorFlow gives the palette indices as grey); other images unchanged."""
    def through_palette():
        header, colours = u32le(data, 14), u32le(data, 46)
        colours = tf.where((colours > 0) & (colours <= 256), colours, 256)
        palette = tf.reshape(_bytes_at(data, 14 + header, 4 * 256), [256, 4])[:, 2::-1]  # BGRA -> RGB
        return tf.gather(palette, tf.minimum(tf.cast(image[..., 0], tf.int32), colours - 1))

    palette_bmp = is_bmp(data) & tf.equal(u16le(data, 28), 8) & tf.equal(u32le(data, 30), 0)
    return tf.cond(palette_bmp, through_palette, lambda: image)


def decode_pixels(image_bytes):
    """uint8 [h, w, 3] of any format TensorFlow decodes, first frame, as stored (no orientation, no palette)."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_rgb(image_bytes):
    """Decode JPEG / PNG / GIF (first frame) / BMP / WebP bytes to float32 RGB [h, w, 3] 0-255, grayscale and RGBA
    included, as a viewer shows it: JPEG EXIF orientation applied, 8-bit BMPs through their palette. Raises
    tf.errors.InvalidArgumentError on bytes TensorFlow cannot decode (check them with decode.bad_file_reason)."""
    image = decode_pixels(image_bytes)
    image = tf.cond(is_jpeg(image_bytes), lambda: orient(image, jpeg_orientation(image_bytes)),
                    lambda: bmp_colours(image_bytes, image))
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.float32)


def displayed_size(image_bytes):
    """[h, w] int32 of the image as `decode_rgb` shows it (EXIF orientation applied): a JPEG's from its header, other
    formats' by decoding. Boxes and crop windows are given in this frame."""
    return tf.cond(is_jpeg(image_bytes),
                   lambda: displayed_shape(tf.image.extract_jpeg_shape(image_bytes)[:2], jpeg_orientation(image_bytes)),
                   lambda: tf.shape(decode_pixels(image_bytes))[:2])


def rescaled_size(height, width, smallest_side):
    """(h, w) after an isotropic rescale that makes the smaller side `smallest_side` (int32 tensors)."""
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    smallest_side = tf.cast(smallest_side, tf.float32)
    ratio = smallest_side / tf.minimum(height, width)
    new_h = tf.maximum(tf.cast(tf.round(height * ratio), tf.int32), tf.cast(smallest_side, tf.int32))
    new_w = tf.maximum(tf.cast(tf.round(width * ratio), tf.int32), tf.cast(smallest_side, tf.int32))
    return new_h, new_w


def rescale(image, smallest_side):
    """Isotropically rescale `image` so its smaller side is `smallest_side` (the paper's S or Q)."""
    shape = tf.shape(image)
    new_h, new_w = rescaled_size(shape[0], shape[1], smallest_side)
    return tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)


def center_crop(image, size):
    """The central size x size window of `image` (which must be at least that large)."""
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return image[top:top + size, left:left + size, :]


def add_per_channel(image, values):
    """image [..., w, 3] + values [3] (float32). Broadcasting over an innermost axis of 3 is slow in TensorFlow
    (about 3x a plain add), so the values are tiled along whole rows instead."""
    shape = tf.shape(image)
    rows = tf.reshape(image, [-1, shape[-2] * 3]) + tf.tile(tf.cast(values, tf.float32), [shape[-2]])
    return tf.reshape(rows, shape)


def subtract_mean(image, mean_rgb):
    """The paper's only preprocessing: subtract the training set's mean RGB."""
    return add_per_channel(image, -tf.constant(mean_rgb, dtype=tf.float32))
