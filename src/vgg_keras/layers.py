"""Layers the paper needs that Keras does not ship. Pure `keras.ops`: runs on every backend."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vgg_keras")
class LocalResponseNormalization(keras.layers.Layer):
    """Krizhevsky et al.'s LRN across channels, with Caffe's parameters (as in the paper's A-LRN).

    b_c = a_c / (k + alpha / size * sum_{c' within size/2 of c} a_c'^2) ** beta

    `alpha` is Caffe's: divided by the window size. (TensorFlow's local_response_normalization takes the
    per-element alpha, i.e. alpha / size, and depth_radius = size // 2.)

    Computed in float32 whatever the dtype policy (mixed_float16 included), returned in the policy's compute dtype:
    an activation of 300 squares to 90000, beyond float16's range.
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, **kwargs):
        super().__init__(**kwargs)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN size must be a positive odd number, got {size}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def call(self, inputs):
        # Always float32: under mixed_float16 the squares of the activations LRN acts on (hundreds) overflow
        # float16's 65504 and zero the channel and its neighbours (as Keras's own normalisation layers do).
        x = ops.cast(inputs, "float32")
        squared = ops.square(x)
        radius = self.size // 2
        channels = x.shape[-1]
        padded = ops.pad(squared, [[0, 0]] * (len(x.shape) - 1) + [[radius, radius]])
        window_sum = sum(padded[..., i : i + channels] for i in range(self.size))
        return ops.cast(x / ops.power(self.k + (self.alpha / self.size) * window_sum, self.beta), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


@keras.saving.register_keras_serializable(package="vgg_keras")
class MatmulConv2D(keras.layers.Conv2D):
    """A valid, stride-1 Conv2D computed as one matmul over its gathered windows (im2col).

    Same weights, config and outputs as Conv2D. It carries the FC layers of the dense-evaluation net: on CPU,
    oneDNN runs fc1 as a 7x7x512 -> 4096 convolution over a small map at 7-70 G multiply-adds/s (it streams the
    400 MB kernel per few outputs), while the same arithmetic as one matmul runs at 40-120 (2 cores, config D,
    Q = 256-512); 1x1 convolutions gain 1.4-5x the same way. Windows are gathered with plain slices, so it
    runs on every backend.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        unsupported = {"padding": (self.padding, "valid"), "strides": (self.strides, (1, 1)),
                       "dilation_rate": (self.dilation_rate, (1, 1)), "groups": (self.groups, 1),
                       "data_format": (self.data_format, "channels_last"), "use_bias": (self.use_bias, True)}
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(f"MatmulConv2D {self.name!r}: {name}={value!r} is not supported (only {wanted!r})")

    def call(self, inputs):
        kh, kw = self.kernel_size
        # Window (i, j) of every output position, channels last: concatenated they are the rows of the kernel
        # reshaped to (kh * kw * channels, filters), the row-major order of Flatten over (h, w, c).
        windows = [inputs[:, i:i - kh + 1 or None, j:j - kw + 1 or None] for i in range(kh) for j in range(kw)]
        patches = ops.concatenate(windows, axis=-1) if len(windows) > 1 else inputs
        outputs = ops.matmul(patches, ops.reshape(self.kernel, (-1, self.filters))) + self.bias
        return self.activation(outputs)
