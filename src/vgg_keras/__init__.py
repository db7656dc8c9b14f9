"""vgg-keras: the VGG paper (Simonyan & Zisserman, 2015) end to end in Keras 3."""

# First, before anything imports TensorFlow: its oneDNN kernels on x86 CPUs (see machine.py).
from .machine import choose_onednn

choose_onednn()

# isort: split

from .configs import CONFIG_NAMES, TABLE_1
from .layers import LocalResponseNormalization
from .model import build_vgg, fully_convolutional, initialize_from, load_weights_by_name, multiply_adds

__all__ = [
    "CONFIG_NAMES",
    "TABLE_1",
    "LocalResponseNormalization",
    "build_vgg",
    "fully_convolutional",
    "initialize_from",
    "load_weights_by_name",
    "multiply_adds",
]
