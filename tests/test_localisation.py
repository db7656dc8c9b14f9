"""Localisation nets (PAPER.md section 5): the PCR loss, --fine-tune fc, dense boxes against the FC net's, and a
short demo run that learns boxes."""

import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vgg_keras import boxes as vb
from vgg_keras import localisation as loc
from vgg_keras.model import conv_layers, fully_convolutional
from vgg_keras.runs import load_run

from conftest import make_run_dir


def _cfg(**kwargs):
    settings = dict(config="A", crop=32, scale=(32, 40), regression="per-class", fine_tune="all", init="glorot",
                    seed=0, batch_size=4)
    return loc.LocalisationConfig(**{**settings, **kwargs})


def test_pcr_loss_counts_only_the_ground_truth_class():
    loss = loc.BoxLoss(num_classes=3)
    y_true = tf.constant([[2, 0.5, 0.5, 0.2, 0.4], [0, 0.1, 0.2, 0.3, 0.4]])
    y_pred = tf.Variable(tf.random.normal([2, 12], seed=1))
    with tf.GradientTape() as tape:
        value = loss(y_true, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    own = [(0, slice(8, 12)), (1, slice(0, 4))]
    mask = np.zeros_like(grad, bool)
    for row, columns in own:
        mask[row, columns] = True
        assert np.all(grad[row, columns] != 0)
    assert np.all(grad[~mask] == 0)
    expected = np.mean([0.5 * np.sum((y_pred.numpy()[r, c] - y_true.numpy()[r, 1:]) ** 2) for r, c in own])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    # changing another class's outputs leaves the loss unchanged
    other = y_pred.numpy().copy()
    other[0, :8] += 100
    assert float(loss(y_true, tf.constant(other))) == pytest.approx(float(value), rel=1e-6)
    # SCR: the 4 outputs are every class's box
    assert float(loc.BoxLoss(3)(y_true, y_pred[:, 8:12])) == pytest.approx(
        np.mean([0.5 * np.sum((y_pred.numpy()[r, 8:12] - y_true.numpy()[r, 1:]) ** 2) for r in range(2)]), rel=1e-5)


def test_fine_tune_fc_leaves_the_conv_weights_unchanged():
    model = loc.build_localisation_model(_cfg(fine_tune="fc", lr=0.1), num_classes=3)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers if layer.weights}
    x = np.random.default_rng(0).normal(0, 50, (4, 32, 32, 3)).astype("float32")
    y = np.array([[0, .5, .5, .5, .5], [1, .3, .3, .2, .2], [2, .6, .4, .5, .3], [0, .5, .5, 1, 1]], "float32")
    model.train_on_batch(x, y)
    for layer in model.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
        assert same == (layer in conv_layers(model)), layer.name
    assert model.output_shape == (None, 12)
    assert [layer.name for layer in model.layers[-5:]] == ["fc1", "fc1_dropout", "fc2", "fc2_dropout", "predictions"]


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_dense_box_at_the_crop_size_equals_the_fc_nets(tmp_path):
    model = loc.build_localisation_model(_cfg(regression="single-class"), num_classes=3)
    x = np.random.default_rng(1).normal(0, 50, (2, 32, 32, 3)).astype("float32")
    dense = fully_convolutional(model)(x).numpy()
    assert dense.shape == (2, 1, 1, 4)
    np.testing.assert_allclose(dense[:, 0, 0], model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)
    # and through evaluation's two paths, in image pixels: the centre crop of a 32 x 32 image at Q = 32 is the image
    run_dir = make_run_dir(tmp_path / "loc", num_classes=3, crop=32, scale=(32, 32))
    model.save(run_dir / "best.keras")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "regression": "single-class"}))
    member = loc.load_members([str(run_dir)], "center", scales=(32,))[0]
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    data = tf.constant(_png(image))
    center = loc.center_boxes(member, data, 0)[0]
    dense_boxes = loc.dense_box_maps(member, tf.constant(image, tf.float32), flip=False)[0]
    assert dense_boxes.shape == (1, 1, 4)
    np.testing.assert_allclose(dense_boxes[0, 0], center, atol=1e-2)
    # the mirror's box, mapped back, is the box of the mirrored image mirrored
    both = loc.dense_box_maps(member, tf.constant(image, tf.float32), flip=True)[0]
    mirrored = loc.dense_box_maps(member, tf.constant(image[:, ::-1].copy(), tf.float32), flip=False)[0][0, 0]
    np.testing.assert_allclose(both[1, 0], [32 - mirrored[2], mirrored[1], 32 - mirrored[0], mirrored[3]], atol=1e-2)


def test_dense_boxes_are_offset_by_32_pixels_per_location(tmp_path):
    """A net whose predictions are a constant box: every location's box is that box in its own window."""
    member = _constant_box_member(tmp_path)
    image = tf.zeros([32, 48, 3])  # rescaled to 64 x 96: a 2 x 3 map; pixels per image pixel 2
    boxes = loc.dense_box_maps(member, image, flip=True)[0].reshape(2, 2, 3, 4)
    # location (i, j): window at (32 i, 32 j) of the rescaled image, box [8, 12, 24, 20] in it; /2 to the image
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(boxes[0, i, j], np.array([32 * j + 8, 32 * i + 12, 32 * j + 24,
                                                                  32 * i + 20]) / 2, atol=1e-4)
    # the mirror's location j is the window at 96 - 32 (j + 1) of the unmirrored image
    np.testing.assert_allclose(boxes[1, 0, 0], np.array([96 - 24, 12, 96 - 8, 20]) / 2, atol=1e-4)


def _constant_box_member(tmp_path, box=(0.5, 0.5, 0.5, 0.25), scales=(64,)):
    """A single-class net whose every location predicts `box` (cx, cy, w, h in crop units) in its own window."""
    model = loc.build_localisation_model(_cfg(regression="single-class"), num_classes=3)
    kernel, _ = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([np.zeros_like(kernel), np.array(box, "float32")])
    run_dir = make_run_dir(tmp_path / "loc", num_classes=3, crop=32, scale=(32, 32))
    model.save(run_dir / "best.keras")
    return loc.load_members([str(run_dir)], "dense", scales=scales)[0]


def test_dense_boxes_of_a_bounded_view_map_back_into_the_image(tmp_path):
    """--max-pixels: a banner is evaluated on its central window, a large image at a smaller Q
    (`evaluate.bounded_view`); every box still lands where its location looked, inside the image."""
    from vgg_keras.evaluate import bounded_view

    member = _constant_box_member(tmp_path, scales=(32,))
    banner = tf.zeros([32, 320, 3])  # at Q = 32: 32 x 320 > 3072 pixels; the central 32 x 96 window is seen
    _, size, window = (np.asarray(v) for v in bounded_view(32, 320, 32, 32, 3072))
    assert list(size) == [32, 320] and list(window) == [0, 112, 32, 96]
    boxes = loc.dense_box_maps(member, banner, flip=True, max_pixels=3072)[0].reshape(2, 3, 4)
    for j in range(3):  # box [8, 12, 24, 20] in the patch at (0, 112 + 32 j); the mirror's within the window
        np.testing.assert_allclose(boxes[0, j], [112 + 32 * j + 8, 12, 112 + 32 * j + 24, 20], atol=1e-4)
        np.testing.assert_allclose(boxes[1, j], [112 + 96 - 32 * j - 24, 12, 112 + 96 - 32 * j - 8, 20], atol=1e-4)
    assert boxes[..., [0, 2]].min() >= 0 and boxes[..., [0, 2]].max() <= 320 and boxes[..., [1, 3]].max() <= 32
    # a 32 x 48 image at Q = 64 within 2000 pixels: rescaled to 36 x 54 (one location), scaled back by 32 / 36
    assert list(np.asarray(bounded_view(32, 48, 64, 32, 2000)[1])) == [36, 54]
    small = loc.dense_box_maps(_constant_box_member(tmp_path / "q"), tf.zeros([32, 48, 3]), flip=False,
                               max_pixels=2000)[0]
    np.testing.assert_allclose(small.reshape(4), np.array([8, 12, 24, 20]) * np.array([48 / 54, 32 / 36] * 2),
                               atol=1e-3)
    # where the bound leaves the view whole, the boxes are the unbounded ones (a random net on a random image)
    model = loc.build_localisation_model(_cfg(regression="per-class"), num_classes=3)
    run_dir = make_run_dir(tmp_path / "pcr", num_classes=3, crop=32, scale=(32, 32))
    model.save(run_dir / "best.keras")
    pcr = loc.load_members([str(run_dir)], "dense", scales=(64,))[0]
    image = tf.constant(np.random.default_rng(4).integers(0, 256, (32, 48, 3)), tf.float32)
    whole = loc.dense_box_maps(pcr, image, max_pixels=64 * 96)[0]
    np.testing.assert_allclose(whole, loc.dense_box_maps(pcr, image)[0], rtol=1e-5, atol=1e-3)
    assert whole.shape == (2 * 2 * 3, 3, 4)


def test_export_localise_signature_answers_through_the_session_loader(tmp_path):
    """`vgg-keras export --model CLS --localisation LOC`: the `localise` signature, read by TF1's session loader
    (`saved_model_cli run`, as TF Serving), returns the classifier's top-k and the dense protocol's boxes."""
    import pathlib
    import subprocess
    import sys

    from vgg_keras import cli

    classifier = make_run_dir(tmp_path / "cls", num_classes=3, crop=32, scale=(32, 32))
    loc_dir = make_run_dir(tmp_path / "loc", num_classes=3, crop=32, scale=(32, 32))
    model = loc.build_localisation_model(_cfg(), num_classes=3)
    model.save(loc_dir / "best.keras")
    config = json.loads((loc_dir / "config.json").read_text())
    (loc_dir / "config.json").write_text(json.dumps({**config, "regression": "per-class"}))
    out = tmp_path / "saved_models"
    assert not cli.main(["export", "--model", str(classifier), "--localisation", str(loc_dir), "--name", "loc",
                         "--scales", "32,40", "--top-k", "2", "--out", str(out)])
    image = np.random.default_rng(3).integers(0, 256, (40, 56, 3)).astype(np.uint8)
    inputs, outdir = tmp_path / "in.npy", tmp_path / "out"
    np.save(inputs, np.array([_png(image)], dtype=object), allow_pickle=True)
    cli_bin = pathlib.Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run([str(cli_bin), "run", "--dir", str(out / "loc" / "1"), "--tag_set", "serve",
                             "--signature_def", "localise", "--inputs", f"image_bytes={inputs}", "--outdir",
                             str(outdir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    served = {name: np.load(outdir / f"{name}.npy", allow_pickle=True) for name in ("classes", "scores", "boxes")}
    assert served["boxes"].shape == (1, 2, 4)
    # the same boxes as evaluation's dense protocol with the same nets and scales
    member = loc.load_members([str(loc_dir)], "dense", scales=(32, 40))[0]
    expected = loc.image_class_boxes([member], {"image": tf.constant(_png(image))}, list(served["classes"][0]),
                                     "dense")
    for column, c in enumerate(served["classes"][0]):
        np.testing.assert_allclose(served["boxes"][0, column], expected[int(c)], rtol=1e-3, atol=1e-2)


def test_train_localisation_runs_train_loop_from_the_classifier(tmp_path):
    """`train-localisation` through train.train's loop (per-worker input pipelines, the chief's start weights): one
    epoch on a few boxed images; with --fine-tune fc the conv layers stay the classification run's."""
    data = tmp_path / "data"
    items = []
    for split, count in (("train", 4), ("val", 2)):
        for c in range(3):
            for i in range(count):
                image = np.zeros((48, 64, 3), np.uint8)
                x0, y0 = 4 + 8 * c + i, 6 + 4 * i
                image[y0:y0 + 24, x0:x0 + 30] = 255
                path = data / split / f"class_{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png(image))
                items.append({"file": f"{split}/class_{c}/{i}.png", "label": f"class_{c}", "width": 64, "height": 48,
                              "box": [x0, y0, x0 + 30, y0 + 24]})
    (data / "annotations.json").write_text(json.dumps({"classes": [f"class_{c}" for c in range(3)], "images": items}))
    classifier = make_run_dir(tmp_path / "cls", num_classes=3, crop=32, scale=(32, 40), seed=7)  # not cfg's seed
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps({**config, "data": str(data), "batch_size": 4}))
    cfg = loc.LocalisationConfig(from_run=str(classifier), run_dir=str(tmp_path / "loc"), epochs=1, fine_tune="fc",
                                 init="glorot")
    state = loc.train_localisation(cfg)
    assert state["epoch"] == 1 and "val_iou" in state["history"][0] and 0 <= state["best_top1"] <= 1
    trained, source = load_run(tmp_path / "loc").model, load_run(classifier).model
    assert trained.output_shape == (None, 12)
    for layer in conv_layers(source):
        for a, b in zip(layer.get_weights(), trained.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)


def _center_crop_boxes(annotations, split, q, crop):
    """The ground-truth boxes of `split` as the centre crop at Q sees them, [x0, y0, x1, y1] in crop units: the
    shorter side rescaled to Q, the central crop x crop window (an independent numpy version of the validation)."""
    boxes = []
    for item in annotations["images"]:
        if item["file"].startswith(split + "/"):
            s = q / min(item["width"], item["height"])
            dx, dy = (item["width"] * s - crop) / 2, (item["height"] * s - crop) / 2
            boxes.append((np.array(item["box"]) * s - [dx, dy, dx, dy]) / crop)
    return np.array(boxes)


@pytest.mark.slow
def test_a_short_demo_run_learns_boxes_better_than_the_best_constant_box(tmp_path):
    """make train then make train-loc, in short: a two-class classifier (the demo recipe, 4 epochs) fine-tuned into a
    PCR net (all layers, lr 0.01) whose validation mean IoU clearly beats the mean training box's. The objects are
    spread wider than the default demo's (30-90 % of the shorter side, centre within 30 %): the default ones are so
    large and central that a constant box already reaches IoU ~0.63. Dropout and weight decay are off for the box
    training: with them, 6 epochs gained 0.045 over the constant box, without them 0.075. Measured (seed 0, 2-core
    AMD EPYC, ~3 min): constant box 0.434; the net 0.44, 0.44, 0.46, 0.46, 0.50, 0.51, 0.55, 0.60 after epochs
    1-8 (the classifier's validation top-1 0.62, 0.59, 0.70, 0.67)."""
    from vgg_keras.data.demo import make_demo_data
    from vgg_keras.train import TrainConfig, train

    annotations = make_demo_data(tmp_path / "demo", train_per_class=480, val_per_class=50,
                                 classes=("circle", "cross"), object_range=(0.3, 0.9), centre_spread=0.3)
    train(TrainConfig(config="A", data=str(tmp_path / "demo"), run_dir=str(tmp_path / "cls"), scale=(32, 40),
                      crop=32, batch_size=32, lr=0.01, epochs=4, init="glorot"))
    cfg = loc.LocalisationConfig(from_run=str(tmp_path / "cls"), run_dir=str(tmp_path / "loc"), epochs=8, lr=0.01,
                                 dropout=0.0, weight_decay=0.0)
    state = loc.train_localisation(cfg)
    run = load_run(tmp_path / "loc")
    assert run.config["boxes"] == str(tmp_path / "demo" / "annotations.json")  # the demo's boxes by default
    q, crop = run.config["val_q"], run.crop
    truth = _center_crop_boxes(annotations, "val", q, crop)
    constant = _center_crop_boxes(annotations, "train", q, crop).mean(axis=0)
    baseline = float(vb.iou(constant, truth).mean())
    learned = [row["val_iou"] for row in state["history"]]
    assert len(learned) == 8 and len(truth) == 100
    assert max(learned) >= baseline + 0.08, f"constant box {baseline:.3f}, the net per epoch {learned}"
    assert state["best_top1"] == pytest.approx(max(learned))
