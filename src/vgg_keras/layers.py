"""Layers the paper needs that Keras does not ship. Pure `keras.ops`: runs on every backend."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vgg_keras")
class LocalResponseNormalization(keras.layers.Layer):
    """Krizhevsky et al.'s LRN across channels, with Caffe's parameters (as in the paper's A-LRN).

    b_c = a_c / (k + alpha / size * sum_{c' within size/2 of c} a_c'^2) ** beta

    `alpha` is Caffe's: divided by the window size. (TensorFlow's local_response_normalization takes the
    per-element alpha, i.e. alpha / size, and depth_radius = size // 2.)
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, **kwargs):
        super().__init__(**kwargs)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN size must be a positive odd number, got {size}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def call(self, inputs):
        squared = ops.square(inputs)
        radius = self.size // 2
        channels = inputs.shape[-1]
        padded = ops.pad(squared, [[0, 0]] * (len(inputs.shape) - 1) + [[radius, radius]])
        window_sum = sum(padded[..., i : i + channels] for i in range(self.size))
        return inputs / ops.power(self.k + (self.alpha / self.size) * window_sum, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}
