"""The foundation: Table 1, the builder, LRN, weight decay, initialisation, pre-init, dense conversion."""

import ast
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import vgg_keras
from vgg_keras.layers import MatmulConv2D
from vgg_keras.model import PRE_INIT_LAYERS

PAPER_PARAMETER_COUNTS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}


@pytest.mark.parametrize("config", sorted(PAPER_PARAMETER_COUNTS))
def test_parameter_counts_match_the_paper(config):
    model = vgg_keras.build_vgg(config, num_classes=1000, init="glorot")
    assert model.count_params() == PAPER_PARAMETER_COUNTS[config]


def test_multiply_adds_match_the_paper():
    # PAPER.md section 1: A 7.6 G, B 11.3 G, C 11.8 G, D 15.5 G, E 19.6 G at 224x224
    expected = {"A": 7.6, "B": 11.3, "C": 11.8, "D": 15.5, "E": 19.6}
    for config, giga in expected.items():
        model = vgg_keras.build_vgg(config, num_classes=1000, input_shape=(224, 224, 3), init="glorot")
        assert round(vgg_keras.multiply_adds(model) / 1e9, 1) == giga


def test_layer_names_follow_keras_applications():
    names = [layer.name for layer in vgg_keras.build_vgg("C", num_classes=10, input_shape=(32, 32, 3)).layers]
    assert names[:4] == ["input_layer", "block1_conv1", "block1_conv2", "block1_pool"]
    assert ["block3_conv1", "block3_conv2", "block3_conv3", "block3_pool"] == names[7:11]
    assert names[-6:] == ["flatten", "fc1", "fc1_dropout", "fc2", "fc2_dropout", "predictions"]
    c = vgg_keras.build_vgg("C", num_classes=10, input_shape=(32, 32, 3))
    assert c.get_layer("block3_conv3").kernel.shape[:2] == (1, 1)  # C's conv1-256
    lrn = vgg_keras.build_vgg("A-LRN", num_classes=10, input_shape=(32, 32, 3))
    assert isinstance(lrn.get_layer("block1_lrn"), vgg_keras.LocalResponseNormalization)


def _copy_by_name(source, target):
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())


@pytest.mark.parametrize("config, reference", [("D", keras.applications.VGG16), ("E", keras.applications.VGG19)])
def test_d_and_e_equal_keras_applications(config, reference, rng):
    theirs = reference(weights=None, include_top=True, input_shape=(32, 32, 3), classes=10)
    ours = vgg_keras.build_vgg(config, num_classes=10, input_shape=(32, 32, 3), init="glorot")
    assert [(l.name, [tuple(w.shape) for w in l.weights]) for l in ours.layers if l.weights] == [
        (l.name, [tuple(w.shape) for w in l.weights]) for l in theirs.layers if l.weights
    ]
    _copy_by_name(theirs, ours)
    x = rng.uniform(-120, 120, size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-5, rtol=0)


def test_weights_load_by_name_from_keras_and_legacy_h5_files(tmp_path, rng):
    from keras.src.legacy.saving import legacy_h5_format  # writes the layout of keras.applications' files
    import h5py

    theirs = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=7)
    x = rng.uniform(-120, 120, size=(2, 32, 32, 3)).astype("float32")
    expected = theirs.predict(x, verbose=0)
    theirs.save_weights(tmp_path / "vgg16.weights.h5")
    with h5py.File(tmp_path / "vgg16_legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, theirs)
    for path in ("vgg16.weights.h5", "vgg16_legacy.h5"):
        ours = vgg_keras.build_vgg("D", num_classes=7, input_shape=(32, 32, 3), weights=str(tmp_path / path))
        np.testing.assert_allclose(ours.predict(x, verbose=0), expected, atol=1e-5, rtol=0)
    wrong = vgg_keras.build_vgg("D", num_classes=9, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="predictions.*shapes"):
        vgg_keras.load_weights_by_name(wrong, str(tmp_path / "vgg16.weights.h5"))
    with pytest.raises(ValueError, match="block3_conv4"):
        vgg_keras.build_vgg("E", num_classes=7, input_shape=(32, 32, 3), weights=str(tmp_path / path))


def test_bgr_weight_files_see_rgb_input(tmp_path, rng):
    # keras.applications' VGG files expect BGR (Caffe); ours feed RGB: loaded with channels="bgr", our model on an
    # RGB image must equal the file's model on the same image in BGR order.
    theirs = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=3)
    theirs.save_weights(tmp_path / "bgr.weights.h5")
    rgb = rng.uniform(-120, 120, size=(2, 32, 32, 3)).astype("float32")
    ours = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), weights=str(tmp_path / "bgr.weights.h5"),
                               weights_channels="bgr")
    np.testing.assert_allclose(ours.predict(rgb, verbose=0), theirs.predict(rgb[..., ::-1], verbose=0), atol=1e-5)
    assert not np.allclose(ours.predict(rgb, verbose=0), theirs.predict(rgb, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="'brg'.*'rgb' or 'bgr'"):
        vgg_keras.load_weights_by_name(ours, str(tmp_path / "bgr.weights.h5"), channels="brg")


@pytest.fixture(scope="module")
def model_224():
    return vgg_keras.build_vgg("A", num_classes=10, input_shape=(224, 224, 3), init="glorot", seed=1)


def test_fully_convolutional_equals_fc_model_at_224(model_224, rng):
    x = rng.uniform(-120, 120, size=(2, 224, 224, 3)).astype("float32")
    expected = model_224.predict(x, verbose=0)
    dense = vgg_keras.fully_convolutional(model_224, average=True, softmax=True)
    np.testing.assert_allclose(dense.predict(x, verbose=0), expected, atol=1e-5, rtol=0)
    score_map = vgg_keras.fully_convolutional(model_224)(x)
    assert score_map.shape == (2, 1, 1, 10)
    np.testing.assert_allclose(keras.ops.softmax(score_map[:, 0, 0]), expected, atol=1e-5, rtol=0)


def test_fully_convolutional_score_map_size(model_224, rng):
    dense = vgg_keras.fully_convolutional(model_224)
    assert dense.input_shape == (None, None, None, 3)
    x = rng.uniform(-120, 120, size=(1, 288, 320, 3)).astype("float32")
    score_map = dense(x)
    assert score_map.shape == (1, 3, 4, 10)
    averaged = vgg_keras.fully_convolutional(model_224, average=True)(x)
    np.testing.assert_allclose(averaged, keras.ops.mean(score_map, axis=(1, 2)), atol=1e-5)


def test_fully_convolutional_shares_weights():
    model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3))
    dense = vgg_keras.fully_convolutional(model)
    assert dense.get_layer("block1_conv1") is model.get_layer("block1_conv1")
    assert dense.get_layer("fc1").kernel.shape == (1, 1, 512, 4096)  # at 32 px block5_pool is 1x1
    with pytest.raises(ValueError, match="include_top=True"):
        vgg_keras.fully_convolutional(vgg_keras.build_vgg("A", include_top=False, input_shape=(32, 32, 3)))


@pytest.mark.parametrize("kernel_size, spatial", [((3, 2), (6, 5)), (1, (4, 7)), ((7, 7), (7, 7))])
def test_matmul_conv2d_equals_conv2d(kernel_size, spatial, rng):
    x = rng.normal(0, 1, size=(2, *spatial, 5)).astype("float32")
    conv = keras.layers.Conv2D(4, kernel_size, activation="relu")
    matmul_conv = MatmulConv2D(4, kernel_size, activation="relu")
    expected = conv(x)
    matmul_conv.build(x.shape)
    matmul_conv.set_weights(conv.get_weights())
    assert matmul_conv.kernel.shape == conv.kernel.shape
    np.testing.assert_allclose(matmul_conv(x), expected, atol=1e-5, rtol=0)
    assert float(keras.ops.max(expected)) > 0  # not all clipped by the relu


def test_matmul_conv2d_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="padding='same' is not supported"):
        MatmulConv2D(4, 3, padding="same", name="fc1")
    with pytest.raises(ValueError, match=r"strides=\(2, 2\)"):
        MatmulConv2D(4, 3, strides=2)


def test_lrn_matches_tensorflow(rng):
    x = rng.normal(0, 10, size=(2, 5, 5, 16)).astype("float32")
    ours = vgg_keras.LocalResponseNormalization(size=5, alpha=1e-4, beta=0.75, k=2.0)(x)
    # TensorFlow's alpha is per element: Caffe's alpha / size
    theirs = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4 / 5, beta=0.75)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, x / 2.0**0.75, rtol=1e-4)  # the window really contributes at this scale
    with pytest.raises(ValueError, match="odd"):
        vgg_keras.LocalResponseNormalization(size=4)


def test_lrn_computes_in_float32_under_mixed_float16(rng):
    # Activations in the hundreds, where LRN acts: 300 ** 2 = 90000 overflows float16 (max 65504).
    x = rng.uniform(-20, 20, size=(2, 3, 3, 8)).astype("float32")
    x[0, 1, 1, 3], x[1, 2, 0, 5] = 300.0, -280.0
    exact = vgg_keras.LocalResponseNormalization()(x)
    mixed = vgg_keras.LocalResponseNormalization(dtype="mixed_float16")
    out = mixed(x)
    assert mixed.compute_dtype == "float16" and out.dtype == "float16"
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2e-3, atol=1e-2)
    # the numbers of the bug report: 300 -> 110.05, its neighbour 20 -> 7.34 (both were 0 in float16)
    x1 = np.zeros((1, 1, 1, 5), np.float32)
    x1[0, 0, 0, 2], x1[0, 0, 0, 3] = 300.0, 20.0
    out1 = np.asarray(mixed(x1), np.float32)[0, 0, 0]
    np.testing.assert_allclose(out1[2:4], [110.05, 7.34], rtol=2e-3)


def test_lrn_survives_save_and_load(tmp_path, rng):
    model = vgg_keras.build_vgg("A-LRN", num_classes=3, input_shape=(32, 32, 3), init="glorot")
    model.save(tmp_path / "a_lrn.keras")
    loaded = keras.saving.load_model(tmp_path / "a_lrn.keras")
    x = rng.uniform(-120, 120, size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_weight_decay_has_caffe_meaning(rng):
    model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), weight_decay=5e-4)
    layer = model.get_layer("block2_conv1")
    with tf.GradientTape() as tape:
        penalty = layer.kernel_regularizer(layer.kernel)
    gradient = tape.gradient(penalty, layer.kernel)
    np.testing.assert_allclose(gradient, 5e-4 * layer.kernel.numpy(), rtol=1e-5)
    assert layer.bias_regularizer is None
    assert len(model.losses) == 11  # 8 convs + 3 FC kernels
    assert not vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3)).losses


def test_paper_initialisation_statistics():
    model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="paper", init_std=0.01, seed=3)
    kernel = model.get_layer("fc2").kernel.numpy()
    assert abs(kernel.mean()) < 1e-4
    assert kernel.std() == pytest.approx(0.01, rel=0.01)
    assert all(not layer.bias.numpy().any() for layer in model.layers if getattr(layer, "bias", None) is not None)
    wider = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init_std=0.05, seed=3)
    assert wider.get_layer("fc2").kernel.numpy().std() == pytest.approx(0.05, rel=0.01)


def test_glorot_initialisation_statistics():
    model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=3)
    kernel = model.get_layer("block5_conv1").kernel.numpy()  # 3x3x512x512
    fan_in, fan_out = 9 * 512, 9 * 512
    limit = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= limit * (1 + 1e-6)  # float32 rounding at the bound
    assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.01)
    with pytest.raises(ValueError, match="unknown init 'he'"):
        vgg_keras.build_vgg("A", input_shape=(32, 32, 3), init="he")


def test_initialize_from_copies_the_papers_layers():
    a = vgg_keras.build_vgg("A", num_classes=5, input_shape=(32, 32, 3), init="glorot", seed=1)
    d = vgg_keras.build_vgg("D", num_classes=5, input_shape=(32, 32, 3), init="glorot", seed=2)
    untouched = {name: d.get_layer(name).get_weights()[0].copy() for name in ("block1_conv2", "block4_conv1")}
    copied = vgg_keras.initialize_from(d, a)
    assert copied == ["block1_conv1", "block2_conv1", "block3_conv1", "block3_conv2", "fc1", "fc2", "predictions"]
    assert tuple(copied) == PRE_INIT_LAYERS
    for name in copied:
        for ours, theirs in zip(d.get_layer(name).get_weights(), a.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)
    for name, before in untouched.items():
        np.testing.assert_array_equal(d.get_layer(name).get_weights()[0], before)


def test_initialize_from_refuses_shape_mismatch():
    a = vgg_keras.build_vgg("A", num_classes=5, input_shape=(32, 32, 3))
    d = vgg_keras.build_vgg("D", num_classes=7, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"vgg_a/predictions .*\(4096, 5\).*vgg_d/predictions .*\(4096, 7\)"):
        vgg_keras.initialize_from(d, a)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown VGG configuration 'F'.*A, A-LRN, B, C, D, E"):
        vgg_keras.build_vgg("F")
    with pytest.raises(ValueError, match=r"\(31, 64, 3\) is too small.*32x32"):
        vgg_keras.build_vgg("A", input_shape=(31, 64, 3))
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        vgg_keras.build_vgg("A", num_classes=0, input_shape=(32, 32, 3))
    assert vgg_keras.build_vgg("a-lrn", num_classes=2, input_shape=(32, 32, 3)).name == "vgg_a_lrn"


def test_summary_command_prints_table_params_and_multiply_adds():
    result = subprocess.run([sys.executable, "-m", "vgg_keras.cli", "summary", "--config", "C"],
                            capture_output=True, text=True, check=True)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.startswith("block")}
    # C's block3_conv3 is the 1x1 conv: 256 * 256 + 256 parameters, where B's 3x3 has 9 * 256 * 256 + 256
    assert rows["block3_conv3"][1:] == ["56x56x256", f"{256 * 256 + 256:,}"]
    assert rows["block3_conv2"][1:] == ["56x56x256", f"{9 * 256 * 256 + 256:,}"]
    assert "133,638,952 parameters" in result.stdout
    assert "11.77 G multiply-adds at 224x224" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "vgg_keras.cli", "summary", "--config", "Z"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "valid configurations: A, A-LRN, B, C, D, E" in bad.stderr


def test_model_code_is_pure_keras():
    # the builders must run on the JAX and PyTorch backends too: no TensorFlow in model code
    package = pathlib.Path(vgg_keras.__file__).parent
    for module in ("configs.py", "layers.py", "model.py"):
        tree = ast.parse((package / module).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module}
        assert "tensorflow" not in imported, module
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "tf"], module
