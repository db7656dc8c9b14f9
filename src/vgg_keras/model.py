"""The VGG networks of Table 1, built from `configs.TABLE_1` by one builder.

Pure Keras 3 (`keras`, `keras.ops`): the same code runs on the TensorFlow, JAX and PyTorch backends.
Layer names follow keras.applications (`block{i}_conv{j}`, `block{i}_pool`, `flatten`, `fc1`, `fc2`,
`predictions`) so that D and E exchange weights with VGG16 / VGG19.
"""

import h5py
import keras
import numpy as np

from .configs import FC_WIDTH, MIN_INPUT_SIZE, TABLE_1, check_config, parse_layer
from .layers import LocalResponseNormalization, MatmulConv2D

# Caffe's weight_decay w adds w * theta to the gradient, i.e. a penalty (w / 2) * |theta|^2;
# keras.regularizers.L2(l) adds l * |theta|^2, hence l = w / 2.
CAFFE_TO_KERAS_L2 = 0.5

# The first four conv layers of A and its three FC layers: what the paper copies into deeper nets.
PRE_INIT_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block3_conv2", "fc1", "fc2", "predictions")


def _initializers(init, init_std, seed):
    if init == "paper":
        return keras.initializers.RandomNormal(mean=0.0, stddev=init_std, seed=seed), "zeros"
    if init == "glorot":
        return keras.initializers.GlorotUniform(seed=seed), "zeros"
    raise ValueError(f"unknown init {init!r}; valid: 'paper' (normal, std init_std), 'glorot'")


def build_vgg(
    config,
    num_classes=1000,
    input_shape=(224, 224, 3),
    include_top=True,
    dropout=0.5,
    weight_decay=0.0,
    init="paper",
    init_std=0.01,
    seed=None,
    weights=None,
    weights_channels="rgb",
    classifier_activation="softmax",
    name=None,
):
    """Build configuration `config` of Table 1 as a functional keras.Model.

    weight_decay: the paper's number in Caffe semantics (5e-4 adds 5e-4 * w to the gradient).
    init: "paper" (normal, mean 0, std `init_std`, zero biases) or "glorot" (Glorot uniform).
    weights: optional path to a keras.applications-style `.h5` / `.weights.h5` file, loaded by layer name;
    weights_channels: the colour order that file expects ("bgr" for keras.applications' files: see
    `load_weights_by_name`).
    """
    config = check_config(config)
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes!r}")
    height, width = input_shape[0], input_shape[1]
    for side in (height, width):
        if side is not None and side < MIN_INPUT_SIZE:
            raise ValueError(
                f"input_shape {tuple(input_shape)} is too small: VGG's five 2x2 poolings need at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels"
            )
    if include_top and (height is None or width is None):
        raise ValueError("include_top=True needs a fixed input size; use fully_convolutional() for any size")

    kernel_init, bias_init = _initializers(init, init_std, seed)
    regularizer = keras.regularizers.L2(weight_decay * CAFFE_TO_KERAS_L2) if weight_decay else None
    dense_args = dict(kernel_initializer=kernel_init, bias_initializer=bias_init,
                      kernel_regularizer=regularizer, bias_regularizer=None)

    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")
    x = inputs
    for block, layers in enumerate(TABLE_1[config], start=1):
        conv_index = 0
        for spec in layers:
            kind, kernel, filters = parse_layer(spec)
            if kind == "lrn":
                x = LocalResponseNormalization(name=f"block{block}_lrn")(x)
                continue
            conv_index += 1
            x = keras.layers.Conv2D(filters, kernel, padding="same", activation="relu",
                                    name=f"block{block}_conv{conv_index}", **dense_args)(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)

    if include_top:
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(FC_WIDTH, activation="relu", name="fc1", **dense_args)(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="fc1_dropout")(x)
        x = keras.layers.Dense(FC_WIDTH, activation="relu", name="fc2", **dense_args)(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="fc2_dropout")(x)
        # float32 so that a mixed-precision model still computes its softmax in full precision
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="predictions",
                               dtype="float32", **dense_args)(x)

    model = keras.Model(inputs, x, name=name or f"vgg_{config.lower().replace('-', '_')}")
    if weights is not None:
        load_weights_by_name(model, weights, weights_channels)
    return model


def conv_layers(model):
    """The model's Conv2D layers in order (the FC-as-conv layers of a dense model excluded)."""
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith("block")]


def fully_convolutional(model, average=False, softmax=False):
    """The dense-evaluation network of Section 3.2, sharing `model`'s weights.

    fc1 becomes a 7x7 (generally: the size of block5_pool's output) valid convolution, fc2 and
    predictions 1x1 convolutions (`MatmulConv2D`: computed as matmuls, several times faster on CPU). The input
    may have any spatial size >= the training crop.
    Returns the class score map [batch, h, w, classes] (pre-softmax), or with `average=True` its
    spatial average [batch, classes]; `softmax=True` applies the softmax after that.
    """
    try:
        fc1 = model.get_layer("fc1")
    except ValueError:
        raise ValueError(f"model {model.name!r} has no fc1 layer: build it with include_top=True") from None
    pool_shape = model.get_layer("block5_pool").output.shape  # (None, h, w, c)
    fc_convs = {
        "fc1": MatmulConv2D(fc1.units, pool_shape[1:3], activation="relu", name="fc1"),
        "fc2": MatmulConv2D(model.get_layer("fc2").units, 1, activation="relu", name="fc2"),
        "predictions": MatmulConv2D(model.get_layer("predictions").units, 1, name="predictions", dtype="float32"),
    }
    inputs = keras.Input(shape=(None, None, model.input_shape[-1]), name="input_layer")
    x = inputs
    for layer in model.layers[1:]:
        if layer.name == "flatten":
            break
        x = layer(x)  # the conv layers themselves: weights shared, not copied
    for name, conv in fc_convs.items():
        x = conv(x)
        kernel, bias = model.get_layer(name).get_weights()
        conv.set_weights([kernel.reshape(conv.kernel.shape), bias])  # Flatten is row-major over (h, w, c)
    if average:
        x = keras.layers.GlobalAveragePooling2D(name="average_scores")(x)
    if softmax:
        x = keras.layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, x, name=f"{model.name}_dense")


def initialize_from(target, source, layer_names=PRE_INIT_LAYERS):
    """Copy the paper's pre-initialisation layers of `source` (a trained A) into `target`.

    Returns the names copied. Refuses a shape mismatch with a message naming both layers and shapes.
    """
    copied = []
    for name in layer_names:
        src, dst = source.get_layer(name), target.get_layer(name)
        src_shapes = [w.shape for w in src.get_weights()]
        dst_shapes = [tuple(w.shape) for w in dst.weights]
        if src_shapes != dst_shapes:
            raise ValueError(
                f"cannot copy {source.name}/{name} with weight shapes {src_shapes} into "
                f"{target.name}/{name} with weight shapes {dst_shapes}"
            )
        dst.set_weights(src.get_weights())
        copied.append(name)
    return copied


def _read_h5_weights(path):
    """{layer name: [arrays]} from a legacy Keras `.h5` or a Keras 3 `.weights.h5` file."""
    weights = {}
    with h5py.File(path, "r") as f:
        if "layers" in f:  # Keras 3: layers/<object path>/vars/<i>, the layer's name in the vars' attrs
            for path, group in f["layers"].items():
                if "vars" in group and len(group["vars"]):
                    variables = group["vars"]
                    name = variables.attrs.get("name", path)
                    weights[name] = [variables[str(i)][()] for i in range(len(variables))]
        else:  # legacy: <name>/weight_names
            root = f["model_weights"] if "model_weights" in f else f
            for name in root.attrs["layer_names"]:
                name = name.decode() if isinstance(name, bytes) else name
                group = root[name]
                names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
                if names:
                    weights[name] = [group[n][()] for n in names]
    return weights


def load_weights_by_name(model, path, channels="rgb"):
    """Load weights by layer name from a keras.applications VGG16/VGG19 file (or any Keras h5 file).

    channels: the colour order the file's first convolution expects, "rgb" (files this project writes) or "bgr"
    (keras.applications' VGG16 / VGG19 files, converted from Caffe: their `preprocess_input` feeds BGR). This
    project's pipelines feed RGB, so "bgr" reverses the input channels of the first conv kernel once, here.
    Every weighted layer of `model` must be found with matching shapes; returns the names loaded.
    Raises ValueError for a missing layer, a shape mismatch or an unknown `channels`.
    """
    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels {channels!r}: expected 'rgb' or 'bgr' (keras.applications VGG files are 'bgr')")
    stored = _read_h5_weights(path)
    first_conv = next(layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    if channels == "bgr" and first_conv in stored:
        kernel, *rest = stored[first_conv]
        stored[first_conv] = [kernel[:, :, ::-1, :], *rest]
    loaded = []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in stored:
            raise ValueError(f"{path}: no weights for layer {layer.name!r} (the file has: {', '.join(stored)})")
        arrays = stored[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise ValueError(f"{path}: layer {layer.name!r} has shapes {[a.shape for a in arrays]} in the file, "
                             f"the model expects {expected}")
        layer.set_weights(arrays)
        loaded.append(layer.name)
    return loaded


def multiply_adds(model):
    """Multiply-adds of one forward pass, counted from the layers' shapes (convs and FC layers)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            kh, kw, cin, cout = layer.kernel.shape
            total += out[1] * out[2] * kh * kw * cin * cout
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total
