"""Transfer features and the linear SVM (PAPER.md section 6): descriptor shapes and norms, flip symmetry, average vs
stack, resumable feature files, the Caltech splits, AP / mAP, and an SVM that beats chance on a tiny run's features."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw

import vgg_keras
from vgg_keras import cli
from vgg_keras import features as ft
from vgg_keras import transfer as tr
from vgg_keras.data.images import subtract_mean
from vgg_keras.data.stats import IMAGENET_STATS
from vgg_keras.runs import Run

CROP = 32


def make_run(seed=0, config="A"):
    model = vgg_keras.build_vgg(config, num_classes=3, input_shape=(CROP, CROP, 3), init="glorot", seed=seed)
    return Run(path=f"mem{seed}", model=model, class_names=["a", "b", "c"], stats=IMAGENET_STATS, scale=(40, 48),
               crop=CROP, config={"config": config})


@pytest.fixture(scope="module")
def run():
    return make_run()


@pytest.fixture(scope="module")
def extractor(run):
    return ft.FeatureExtractor(run)


def random_image(rng, height, width):
    return tf.constant(rng.uniform(0, 255, (height, width, 3)).astype(np.float32))


def records_of(images, labels):
    """In-memory records as the data sources yield them: PNG bytes, label, id."""
    encoded = [tf.io.encode_png(tf.cast(tf.round(image), tf.uint8)).numpy() for image in images]
    return tf.data.Dataset.from_tensor_slices({"image": encoded, "label": np.asarray(labels, np.int64),
                                               "id": [f"img{i}" for i in range(len(images))]})


# --- descriptors --------------------------------------------------------------------------------------------------

def test_descriptor_shapes_and_unit_norm_for_each_layer_and_combination(run, extractor, rng):
    image = random_image(rng, 40, 56)
    average = extractor.describe(image, (32, 48), "average")
    stack = extractor.describe(image, (32, 48, 64), "stack")
    assert average.shape == (4096,) and average.dtype == np.float32
    assert stack.shape == (3 * 4096,)
    assert extractor.output_dim((32, 48, 64), "stack") == 3 * 4096
    for layer, dim in (("block5_pool", 512), ("fc1", 4096)):
        other = ft.FeatureExtractor(run, layer).describe(image, (32, 48), "average")
        assert other.shape == (dim,) and np.linalg.norm(other) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([np.linalg.norm(average), np.linalg.norm(stack)], 1.0, atol=1e-5)
    # two models stacked: their dims add up, and the whole is unit norm again
    both = ft.image_features([extractor, ft.FeatureExtractor(make_run(seed=1))], image, (32,))
    assert both.shape == (8192,) and np.linalg.norm(both) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(both[:4096], both[4096:], atol=1e-3)  # two different nets, two different halves


def test_fc2_descriptor_at_the_crop_is_the_fc_models_penultimate_layer(run, extractor, rng):
    """At Q = crop on a crop-sized image the dense map is 1x1: it must be the FC model's fc2 activation (the
    last layer removed, nothing else)."""
    image = random_image(rng, CROP, CROP)
    penultimate = keras.Model(run.model.input, run.model.get_layer("fc2").output)
    expected = penultimate(subtract_mean(image, IMAGENET_STATS.mean_rgb)[None], training=False).numpy()[0]
    np.testing.assert_allclose(extractor.describe(image, (CROP,), flip=False), ft.l2_normalize(expected),
                               atol=1e-4)


def test_flip_averaging_makes_an_image_and_its_mirror_alike(extractor, rng):
    image = random_image(rng, 44, 60)
    mirror = tf.reverse(image, axis=[1])
    with_flip = [extractor.describe(x, (32, 48), "stack") for x in (image, mirror)]
    np.testing.assert_allclose(with_flip[0], with_flip[1], atol=1e-5)
    without = [extractor.describe(x, (32, 48), "stack", flip=False) for x in (image, mirror)]
    assert np.abs(without[0] - without[1]).max() > 1e-3  # the test could fail: unflipped they differ


def test_average_is_the_mean_over_scales_and_stack_their_concatenation(extractor, rng):
    image = random_image(rng, 40, 50)
    per_scale = extractor.scale_descriptors(image, (32, 48))
    assert per_scale.shape == (2, 4096)
    np.testing.assert_allclose(extractor.describe(image, (32, 48), "average"), ft.l2_normalize(per_scale.mean(0)),
                               atol=1e-6)
    np.testing.assert_allclose(extractor.describe(image, (32, 48), "stack"), ft.l2_normalize(per_scale.ravel()),
                               atol=1e-6)
    assert not np.allclose(per_scale[0], per_scale[1], atol=1e-3)  # the scales do see different images


def test_bad_layer_and_combine_are_refused_by_name(run, extractor, rng):
    with pytest.raises(ValueError, match="--layer 'fc9'.*valid layers: block1_conv1"):
        ft.FeatureExtractor(run, "fc9")
    with pytest.raises(ValueError, match="--combine 'sum'"):
        extractor.describe(random_image(rng, 32, 32), (32,), "sum")


# --- the feature file ---------------------------------------------------------------------------------------------

def test_feature_file_contents_and_a_resumed_extraction(extractor, rng, tmp_path, monkeypatch):
    images = [random_image(rng, 32 + i, 40) for i in range(5)]
    records = records_of(images, [0, 1, 2, 0, 1])
    out = str(tmp_path / "f.npz")
    settings = {"test": 1}
    full, labels, ids, _ = ft.extract([extractor], records, (32,), chunk_images=2, progress=False)
    assert full.shape == (5, 4096) and labels.tolist() == [0, 1, 2, 0, 1] and list(ids) == [f"img{i}" for i in range(5)]

    real, calls = ft.image_features, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ft, "image_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ft.extract([extractor], records, (32,), settings=settings, out=out, chunk_images=2, progress=False)
    assert not os.path.exists(out)  # no half file
    assert sorted(os.listdir(ft.parts_dir(out))) == ["chunk-000000.npz", "settings.json"]
    calls.clear()
    monkeypatch.setattr(ft, "image_features", lambda *args: calls.append(1) or real(*args))
    resumed, labels2, ids2, timing = ft.extract([extractor], records, (32,), settings=settings, out=out,
                                                chunk_images=2, progress=False)
    assert len(calls) == 3 and timing["images"] == 3  # only the images after the saved chunk
    np.testing.assert_allclose(resumed, full, atol=1e-6)
    assert labels2.tolist() == labels.tolist() and list(ids2) == list(ids)
    with pytest.raises(ValueError, match="unfinished extraction with other settings"):
        ft.extract([extractor], records, (48,), settings={"test": 2}, out=out, progress=False)


def test_extract_features_writes_a_loadable_npz_and_an_interrupt_keeps_the_old_one(tmp_path, monkeypatch):
    from conftest import make_run_dir

    run_dir = make_run_dir(tmp_path / "run")
    data = make_colour_data(tmp_path / "data", per_class=2, val_per_class=0)
    out = str(tmp_path / "feat.npz")
    result = ft.extract_features([str(run_dir)], str(data), "train", (32, 40), "stack", out=out, progress=False)
    loaded = ft.load_features(out)
    assert loaded["features"].shape == (6, 2 * 4096) and loaded["features"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(loaded["features"], axis=1), 1.0, atol=1e-5)
    assert loaded["class_names"] == ["blue", "green", "red"] and sorted(loaded["labels"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert loaded["settings"]["scales"] == [32, 40] and loaded["settings"]["combine"] == "stack"
    assert loaded["settings"]["layer"] == "fc2" and loaded["settings"]["models"][0]["config"] == "A"
    assert not os.path.exists(ft.parts_dir(out))  # the chunks are gone once the file is whole
    before = open(out, "rb").read()
    monkeypatch.setattr(ft, "image_features", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ft.extract_features([str(run_dir)], str(data), "train", (32, 40), "stack", out=out, progress=False)
    assert open(out, "rb").read() == before
    np.testing.assert_allclose(result["features"], loaded["features"])
    with pytest.raises(ValueError, match="not a feature file"):
        (tmp_path / "bad.npz").write_bytes(b"nope")
        ft.load_features(str(tmp_path / "bad.npz"))


def test_voc_layout_labels_mark_difficult_only_classes_as_ignored():
    vector = ft.voc_label_vector(tf.constant([3, 5, 5, 1], tf.int64), tf.constant([5, 1], tf.int64), 6)
    assert vector.numpy().tolist() == [0, 1, 0, -1, 0, 1]
    assert vector.dtype == tf.int8


# --- splits, C and metrics ----------------------------------------------------------------------------------------

def test_caltech_splits_are_seeded_and_stratified():
    labels = np.repeat([0, 1, 2], [10, 7, 12])
    splits = tr.caltech_splits(labels, train_per_class=5, test_per_class=3, n_splits=3, seed=4)
    assert len(splits) == 3
    for train, test in splits:
        assert np.bincount(labels[train]).tolist() == [5, 5, 5]
        assert np.bincount(labels[test]).tolist() == [3, 2, 3]  # class 1 has only 2 left
        assert not set(train) & set(test)
    assert not np.array_equal(splits[0][0], splits[1][0])  # the splits differ from each other
    again = tr.caltech_splits(labels, 5, 3, 3, seed=4)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    other = tr.caltech_splits(labels, 5, 3, 3, seed=5)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(splits, other))
    rest = tr.caltech_splits(labels, 5, None, 1, seed=0)[0][1]
    assert np.bincount(labels[rest]).tolist() == [5, 2, 7]
    with pytest.raises(ValueError, match="class 'b' has 7 images: --train-per-class 7 leaves none"):
        tr.caltech_splits(labels, 7, None, 1, class_names=["a", "b", "c"])


def test_average_precision_against_a_hand_computed_case():
    scores = np.array([[0.9, 0.5, 0.1], [0.85, 0.5, 0.2], [0.8, 0.5, 0.3], [0.7, 0.5, 0.4]])
    targets = np.array([[1, 0, 0], [-1, 0, 1], [0, 0, 0], [1, 0, 0]])
    # class 0, the difficult image left out: ranks P, N, P -> precisions 1/1 and 2/3 at the two positives -> 5/6
    # (counted as a negative it would be (1 + 2/4) / 2 = 3/4; as a positive (1 + 1 + 3/4) / 3 = 11/12).
    # class 1 has no positive: left out of the mean. class 2: its positive ranks third of four -> 1/3.
    aps = tr.average_precisions(targets, scores)
    np.testing.assert_allclose(aps[[0, 2]], [100 * 5 / 6, 100 / 3], atol=1e-9)
    assert np.isnan(aps[1])
    assert tr.mean_average_precision(targets, scores) == pytest.approx(100 * (5 / 6 + 1 / 3) / 2)


def test_mean_class_recall_weights_classes_equally():
    labels = np.array([0, 0, 0, 0, 1, 2])
    predictions = np.array([0, 0, 0, 0, 2, 2])  # accuracy 5/6, but class 1 is never recalled
    np.testing.assert_allclose(tr.class_recalls(labels, predictions, 4)[:3], [100, 0, 100])
    assert tr.mean_class_recall(labels, predictions, 4) == pytest.approx(200 / 3)  # class 3 has no test image


def test_holdout_is_stratified_and_c_comes_from_the_grid(rng):
    labels = np.repeat([0, 1], [10, 5])
    fit, held = tr.holdout_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held]).tolist() == [2, 1] and len(fit) + len(held) == 15
    features = ft.l2_normalize(rng.normal(size=(15, 8)) + 3 * np.eye(8)[labels])
    c, table = tr.choose_c(features, labels, 2, grid=(0.1, 1.0))
    assert c in (0.1, 1.0) and [row["c"] for row in table] == [0.1, 1.0]


def test_multilabel_svm_separates_clusters_and_ignores_difficult_labels(rng, tmp_path):
    targets = rng.integers(0, 2, size=(80, 3)).astype(np.int8)
    features = ft.l2_normalize(targets @ rng.normal(size=(3, 16)) + 0.05 * rng.normal(size=(80, 16)))
    targets[:8, 0] = -1  # difficult only: neither positive nor negative for class 0
    svm = tr.LinearSVM(1.0, 3).fit(features[:60], targets[:60])
    assert tr.mean_average_precision(targets[60:], svm.scores(features[60:])) > 95
    without = tr.LinearSVM(1.0, 3).fit(features[8:60], targets[8:60])  # the difficult images left out altogether
    np.testing.assert_allclose(svm.scores(features[60:])[:, 0], without.scores(features[60:])[:, 0], atol=1e-6)
    # the same through run_transfer: multi-label labels select the VOC protocol's report
    settings = {"models": [{"config": "D"}, {"config": "E"}], "layer": "fc2", "scales": [256, 384, 512],
                "combine": "average", "flip": True, "data": "tfds:voc/2007"}
    files = [{"features": features[rows], "labels": targets[rows], "ids": np.arange(80)[rows].astype(str),
              "class_names": ["cat", "dog", "eel"], "settings": settings, "path": name}
             for rows, name in ((slice(0, 60), "train.npz"), (slice(60, 80), "val.npz"))]
    report = tr.run_transfer(files[0], files[1], c=1.0, out=str(tmp_path / "voc.json"))
    assert report["metric"] == "mean AP" and report["protocol"]["name"] == "voc" and report["score"] > 95
    assert "| VGG D & E (fc2, Q {256,384,512}, average) |" in (tmp_path / "voc.md").read_text()
    with pytest.raises(ValueError, match="multi-label data uses mAP"):
        tr.run_transfer(files[0], files[1], splits=2, train_per_class=5)


# --- end to end: a tiny run's features and the SVM -----------------------------------------------------------------

COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_colour_data(root, per_class=12, val_per_class=6, seed=0):
    """Demo-like class folders (root/train/<class>, root/val/<class>): one filled shape on a noisy background in
    images of varied size; the class is the object's colour, which even a randomly initialised net's features
    carry (the demo data's classes are shapes, which only a trained net tells apart)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name, colour in COLOURS.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(36, 64, size=2))
                pixels = rng.integers(60, 190, size=(height, width, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                radius = rng.uniform(0.3, 0.45) * min(width, height)
                cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
                shade = np.clip(np.array(colour) + rng.integers(-25, 26, size=3), 0, 255)
                ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius],
                                              fill=tuple(int(v) for v in shade))
                image.save(root / split / name / f"{i:03d}.png")
    return root


def test_svm_on_a_tiny_runs_features_beats_chance_and_writes_a_table_11_report(tmp_path):
    """3 classes, chance 33.3 %: the SVM must reach a mean class recall of at least 70 % on held-out images."""
    from conftest import make_run_dir

    run_dir = make_run_dir(tmp_path / "run", num_classes=3)
    data = make_colour_data(tmp_path / "data")
    train, val = (str(tmp_path / f"{split}.npz") for split in ("train", "val"))
    for split, out in (("train", train), ("val", val)):
        assert cli.main(["features", "--model", str(run_dir), "--data", str(data), "--split", split,
                         "--scales", "32", "--out", out]) is None
    report_path = tmp_path / "transfer.json"
    assert cli.main(["transfer", "--features-train", train, "--features-val", val, "--out", str(report_path)]) is None
    report = json.loads(report_path.read_text())
    assert report["metric"] == "mean class recall" and report["protocol"]["test_images"] == 18
    assert report["score"] >= 70.0, report
    assert report["c"][0] in tr.C_GRID and len(report["c_search"][0]) == len(tr.C_GRID)
    markdown = (tmp_path / "transfer.md").read_text()
    assert f"| VGG A (fc2, Q 32, average) | {report['score']:.1f} |" in markdown
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Caltech protocol over the same images: 3 seeded splits of 8 training images per class, mean +- std
    caltech = tr.run_transfer(train, val, c=1.0, splits=3, train_per_class=8, seed=1)
    assert len(caltech["split_scores"]) == 3 and caltech["std"] is not None and caltech["score"] >= 70.0
    assert caltech["protocol"]["pool_images"] == 54
    # bad input names the problem
    assert cli.main(["transfer", "--features-train", train]) == 2
    assert cli.main(["transfer", "--features-train", str(tmp_path / "none.npz"), "--features-val", val]) == 2
