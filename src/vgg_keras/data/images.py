"""Image primitives shared by training, evaluation and export (TensorFlow ops, graph-safe).

An image here is a float32 [h, w, 3] RGB tensor with values 0-255, before mean subtraction.
"""

import tensorflow as tf


def decode_rgb(image_bytes):
    """Decode JPEG / PNG / GIF (first frame) / BMP bytes to float32 RGB, grayscale and RGBA included."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.float32)


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
