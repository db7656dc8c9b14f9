"""Evaluation (Section 3.2): grids, scales, dense vs FC, flips, fusion, errors and reports, on tiny models."""

import json

import numpy as np
import pytest
import tensorflow as tf

import vgg_keras
from vgg_keras import evaluate as ev
from vgg_keras.data.images import center_crop
from vgg_keras.data.stats import IMAGENET_STATS
from vgg_keras.report import PredictionWriter, markdown_table, write_report
from vgg_keras.runs import Run

CROP = 32


@pytest.fixture(scope="module")
def model():
    return vgg_keras.build_vgg("A", num_classes=3, input_shape=(CROP, CROP, 3), init="glorot", seed=0)


@pytest.fixture(scope="module")
def scorer(model):
    return ev.ModelScorer(model)


def make_run(model, scale=(40, 48), path="mem"):
    return Run(path=path, model=model, class_names=["cat", "dog", "eel"][:model.output_shape[-1]],
               stats=IMAGENET_STATS, scale=scale, crop=CROP, config={"config": "A"})


def random_image(rng, height, width):
    return tf.constant(rng.uniform(0, 255, (height, width, 3)).astype(np.float32))


def records_of(images, labels):
    """In-memory records as the data pipeline yields them: PNG bytes, label, id."""
    encoded = [tf.io.encode_png(tf.cast(tf.round(image), tf.uint8)).numpy() for image in images]
    return tf.data.Dataset.from_tensor_slices({
        "image": encoded, "label": np.asarray(labels, np.int64), "id": [f"img{i}" for i in range(len(images))]})


# --- grid and scales -------------------------------------------------------------------------------------------

def test_grid_boxes_touch_the_corners_and_centre_the_middle_crop():
    boxes = ev.grid_crop_boxes(50, 71, CROP)
    assert boxes.shape == (25, 4)
    assert (boxes[:, 2:] - boxes[:, :2] == CROP).all()
    assert boxes[0].tolist() == [0, 0, 32, 32]  # top-left corner
    assert boxes[4].tolist() == [0, 39, 32, 71]  # top-right corner
    assert boxes[20].tolist() == [18, 0, 50, 32]  # bottom-left corner
    assert boxes[24].tolist() == [18, 39, 50, 71]  # bottom-right corner
    image = tf.reshape(tf.range(50 * 71 * 3, dtype=tf.float32), (50, 71, 3))
    top, left, bottom, right = boxes[12]
    np.testing.assert_array_equal(image[top:bottom, left:right], center_crop(image, CROP))
    # a regular grid: 5 distinct increasing offsets on each axis, the same on every row / column
    tops, lefts = boxes[::5, 0], boxes[:5, 1]
    assert (np.diff(tops) > 0).all() and (np.diff(lefts) > 0).all()
    assert lefts.tolist() == [0, 9, 19, 30, 39]  # mirror-symmetric: 39 - offset reversed is the same list
    assert (boxes[:, 0].reshape(5, 5) == tops[:, None]).all()


def test_grid_on_an_image_the_size_of_the_crop_is_25_copies_of_it():
    assert (ev.grid_crop_boxes(CROP, CROP, CROP) == [0, 0, CROP, CROP]).all()
    with pytest.raises(ValueError, match="smaller than the 32x32 crop"):
        ev.grid_crop_boxes(31, 40, CROP)


def test_multicrop_runs_150_crops_over_three_scales(scorer, rng, monkeypatch):
    assert ev.views_per_image("multicrop", (256, 384, 512)) == {"crops": 150, "dense": 0}
    assert ev.views_per_image("multicrop+dense", (256, 384, 512)) == {"crops": 150, "dense": 6}
    assert ev.views_per_image("center", (384,), flip=False) == {"crops": 1, "dense": 0}
    seen = []
    real = scorer.crop_posteriors
    monkeypatch.setattr(scorer, "crop_posteriors", lambda crops: seen.append(crops.shape) or real(crops))
    ev.multi_crop_scores(scorer, random_image(rng, 40, 50), (32, 40, 48))
    assert sum(shape[0] for shape in seen) == 150
    assert all(shape[1:] == (CROP, CROP, 3) and shape[0] <= ev.CROP_BATCH for shape in seen)


@pytest.mark.parametrize("train_scale, expected", [
    (256, (224, 256, 288)),
    ((384, 384), (352, 384, 416)),
    ((256, 512), (256, 384, 512)),
    ((40, 47), (40, 43, 47)),  # the middle rounded down
])
def test_paper_test_scales(train_scale, expected):
    assert ev.test_scales(train_scale) == expected


def test_scales_below_the_crop_rescale_to_the_crop(scorer, rng):
    image = random_image(rng, 20, 30)
    assert scorer.prepare(image, 16).shape == (32, 48, 3)
    assert scorer.prepare(image, 40).shape == (40, 60, 3)
    np.testing.assert_allclose(ev.dense_scores(scorer, image, [16]), ev.dense_scores(scorer, image, [32]))
    assert ev.multi_crop_scores(scorer, image, [8, 16]).shape == (3,)


# --- the methods -----------------------------------------------------------------------------------------------

def test_dense_on_a_crop_sized_image_equals_the_fc_model(model, scorer, rng):
    image = random_image(rng, CROP, CROP)
    fc = model(subtract_imagenet_mean(image)[None], training=False).numpy()[0]
    np.testing.assert_allclose(ev.dense_scores(scorer, image, [CROP], flip=False), fc, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ev.center_scores(scorer, image, [CROP], flip=False), fc, rtol=1e-4, atol=1e-6)
    assert not np.allclose(fc, fc.mean())  # posteriors that tell classes apart: the comparison means something


def subtract_imagenet_mean(image):
    return image - np.array(IMAGENET_STATS.mean_rgb, np.float32)


def test_softmax_first_is_an_option_that_changes_dense_results(model, rng):
    image = random_image(rng, 64, 96)  # a 3x5 score map: the two orders differ
    default = ev.dense_scores(ev.ModelScorer(model), image, [64])
    softmax_first = ev.dense_scores(ev.ModelScorer(model, softmax_first=True), image, [64])
    assert np.isclose(softmax_first.sum(), 1.0, atol=1e-5)
    assert not np.allclose(default, softmax_first, atol=1e-7)


@pytest.mark.parametrize("method", ["dense", "multicrop", "center"])
def test_flip_averaging_is_symmetric(scorer, rng, method):
    image = random_image(rng, 40, 60)  # (side - crop) even at both scales: the grid mirrors exactly
    mirror = tf.reverse(image, axis=[1])
    posteriors = [ev.image_posteriors(scorer, x, method, (40, 60))[method] for x in (image, mirror)]
    np.testing.assert_allclose(posteriors[0], posteriors[1], rtol=1e-5, atol=1e-6)
    unflipped = [ev.image_posteriors(scorer, x, method, (40, 60), flip=False)[method] for x in (image, mirror)]
    assert not np.allclose(unflipped[0], unflipped[1], rtol=1e-5, atol=1e-6)  # the flips did the work


def test_multicrop_and_dense_is_their_average(scorer, rng):
    parts = ev.image_posteriors(scorer, random_image(rng, 36, 44), "multicrop+dense", (36,))
    assert list(parts) == ["dense", "multicrop", "multicrop+dense"]
    np.testing.assert_allclose(parts["multicrop+dense"], (parts["dense"] + parts["multicrop"]) / 2)


def test_multiply_adds_of_dense_at_the_crop_equal_the_fc_model(model, scorer):
    assert ev.dense_multiply_adds(scorer.dense_model, CROP, CROP) == vgg_keras.multiply_adds(model)
    one_view = vgg_keras.multiply_adds(model)
    assert ev.method_multiply_adds(scorer, 40, 60, "multicrop", (40,)) == 50 * one_view
    # 64x96 is 6 crops' area; block5 gives 2x3, where fc1 (a 1x1 kernel at crop 32) sits at 6 positions
    assert ev.method_multiply_adds(scorer, 64, 96, "dense", (64,), flip=False) == 6 * one_view
    assert ev.method_multiply_adds(scorer, 64, 96, "dense", (64,)) == 12 * one_view  # and its mirror


# --- errors ----------------------------------------------------------------------------------------------------

def test_top_k_errors_hand_computed():
    probs = np.array([
        [0.50, 0.20, 0.10, 0.08, 0.06, 0.04, 0.02],  # true 0: top-1 right
        [0.50, 0.20, 0.10, 0.08, 0.06, 0.04, 0.02],  # true 1: rank 1, top-1 wrong, top-5 right
        [0.50, 0.20, 0.10, 0.08, 0.06, 0.04, 0.02],  # true 5: rank 5, both wrong
        [0.40, 0.40, 0.10, 0.04, 0.03, 0.02, 0.01],  # true 0 tied with 1 at the top: top-1 wrong (ties count against)
        [0.30, 0.20, 0.15, 0.12, 0.10, 0.10, 0.03],  # true 5 tied with 4 for 5th: 5 others >= it: top-5 wrong
        [0.30, 0.20, 0.20, 0.10, 0.10, 0.05, 0.05],  # true 4 tied with 3 for 4th: rank 4, top-5 right
    ])
    labels = [0, 1, 5, 0, 5, 4]
    assert ev.true_class_rank(probs, labels).tolist() == [0, 1, 5, 1, 5, 4]
    errors = ev.top_k_errors(probs, labels)
    assert errors[1] == pytest.approx(100 * 5 / 6)
    assert errors[5] == pytest.approx(100 * 2 / 6)


def test_a_constant_or_nan_model_is_always_wrong():
    uniform = np.full((4, 10), 0.1)
    assert ev.top_k_errors(uniform, [0, 3, 7, 9]) == {1: 100.0, 5: 100.0}
    nan = np.full((1, 10), np.nan)
    assert ev.top_k_errors(nan, [2]) == {1: 100.0, 5: 100.0}


# --- evaluate, fusion, report ----------------------------------------------------------------------------------

def posteriors_of(runs, records, method, **kwargs):
    seen = []
    report = ev.evaluate(runs, records, method, progress=False,
                         on_image=lambda image_id, label, p: seen.append(p), **kwargs)
    return report, np.array(seen)


def test_ragged_image_sizes_evaluate_without_retracing(model, rng):
    sizes = [(32, 32), (45, 33), (33, 70), (64, 48), (20, 25), (50, 37)]
    records = records_of([random_image(rng, h, w) for h, w in sizes], [0, 1, 2, 0, 1, 2])
    run = make_run(model)
    report, seen = posteriors_of([run], records, "multicrop+dense")
    assert report["images"] == len(sizes) and seen.shape == (len(sizes), 3)
    assert report["models"][0]["traces"] == {"crop": 1, "dense": 1}


def test_undecodable_images_are_skipped_and_listed(model, rng):
    good = records_of([random_image(rng, 40, 40), random_image(rng, 36, 50)], [0, 1])
    bad = tf.data.Dataset.from_tensor_slices({"image": [b"not an image"], "label": np.array([2], np.int64),
                                              "id": ["broken-eval-test.jpg"]})
    report = ev.evaluate([make_run(model)], good.concatenate(bad), "center", progress=False)
    assert report["images"] == 2
    assert list(report["skipped"]) == ["broken-eval-test.jpg"]
    assert "(1 undecodable skipped)" in markdown_table(report)
    with pytest.raises(ValueError, match="no image to evaluate"):
        ev.evaluate([make_run(model)], bad, "center", progress=False)


def test_fusing_a_model_with_itself_equals_the_model(model, rng):
    records = records_of([random_image(rng, 36, 44), random_image(rng, 48, 40)], [2, 0])
    run = make_run(model)
    single, alone = posteriors_of([run], records, "multicrop+dense")
    fused, together = posteriors_of([run, run], records, "multicrop+dense")
    np.testing.assert_allclose(together, alone, rtol=1e-6)
    fusion_rows = [row for row in fused["rows"] if row["fusion"]]
    assert [row["method"] for row in fusion_rows] == ["dense", "multicrop", "multicrop+dense"]
    for row, reference in zip(fusion_rows, single["rows"]):
        assert (row["top1_error"], row["top5_error"]) == (reference["top1_error"], reference["top5_error"])
    assert (fused["top1_error"], fused["top5_error"]) == (single["top1_error"], single["top5_error"])


def test_each_model_uses_its_own_training_scales(model, rng):
    records = records_of([random_image(rng, 40, 40)], [0])
    fixed, jittered = make_run(model, scale=(48, 48), path="a"), make_run(model, scale=(40, 64), path="b")
    report = ev.evaluate([fixed, jittered], records, "center", progress=False)
    assert [m["test_scales"] for m in report["models"]] == [[16, 48, 80], [40, 52, 64]]
    assert report["rows"][-1]["test_scales"] == "{16,48,80} / {40,52,64}"
    forced = ev.evaluate([fixed], records, "center", scales=(40,), progress=False)
    assert forced["models"][0]["test_scales"] == [40] and forced["crops_per_image"] == 2


def test_report_table_and_predictions(model, rng, tmp_path):
    images = [random_image(rng, 40, 52) for _ in range(4)]
    records = records_of(images, [0, 1, 2, 1])
    runs = [make_run(model), make_run(vgg_keras.build_vgg("A", num_classes=3, input_shape=(CROP, CROP, 3),
                                                           init="glorot", seed=1), scale=(48, 48), path="other")]
    with PredictionWriter(str(tmp_path / "predictions.jsonl"), runs[0].class_names) as writer:
        report = ev.evaluate(runs, records, "multicrop+dense", progress=False, on_image=writer)
    assert report["images"] == 4 and report["method"] == "multicrop+dense" and report["flip"] is True
    assert report["crops_per_image"] == 2 * 150 and report["dense_views_per_image"] == 2 * 6
    assert report["wall_time_s"] > 0 and report["images_per_s"] == pytest.approx(4 / report["wall_time_s"], rel=1e-2)
    assert len(report["rows"]) == 9  # 3 methods for each model and for the fusion
    headline = report["rows"][-1]
    assert headline == {"config": "A + A", "train_scale": "[40;48] / 48", "test_scales": "{40,44,48} / {16,48,80}",
                        "method": "multicrop+dense", "top1_error": report["top1_error"],
                        "top5_error": report["top5_error"], "fusion": True}
    assert report["top5_error"] == 0.0  # 3 classes: the truth is always among the top 5
    assert report["top1_error"] in {0.0, 25.0, 50.0, 75.0, 100.0}

    table = markdown_table(report)
    lines = table.splitlines()
    assert lines[0] == "| config | train S | test Q | method | top-1 err. (%) | top-5 err. (%) |"
    assert len([line for line in lines if line.startswith("| A")]) == 9
    fusion_line = "| A + A | [40;48] / 48 | {40,44,48} / {16,48,80} | multicrop+dense | "
    assert f"{fusion_line}{report['top1_error']:.2f} | 0.00 |" in lines
    assert "4 images" in table and "300 crops" in table

    json_path, md_path = write_report(report, str(tmp_path / "report.json"))
    assert json.loads(open(json_path).read())["rows"] == report["rows"]
    assert open(md_path).read() == table
    with pytest.raises(ValueError, match="--out"):
        write_report(report, str(tmp_path / "report.md"))

    predictions = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert [p["id"] for p in predictions] == ["img0", "img1", "img2", "img3"]
    assert [p["label"] for p in predictions] == ["cat", "dog", "eel", "dog"]
    top = predictions[0]["top3"]
    assert sorted(name for name, _ in top) == ["cat", "dog", "eel"]
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-4)


def test_predictions_as_csv(tmp_path):
    path = str(tmp_path / "p.csv")
    with PredictionWriter(path, ["a", "b", "c", "d", "e", "f"]) as write:
        write("x.jpg", 2, np.array([0.1, 0.3, 0.2, 0.05, 0.3, 0.05]))
    header, row = open(path).read().splitlines()
    assert header == "id,label,class1,probability1,class2,probability2,class3,probability3,class4,probability4," \
                     "class5,probability5"
    assert row == "x.jpg,c,b,0.3,e,0.3,c,0.2,a,0.1,d,0.05"  # a tie listed by class index


# --- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "256,,512", "256.5", "abc", "0", "-32", "256;384"])
def test_bad_scales_are_refused(text):
    with pytest.raises(ValueError, match="--scales"):
        ev.parse_scales(text)


def test_scales_parse():
    assert ev.parse_scales("256, 384,512") == (256, 384, 512)
    assert ev.parse_scales("16") == (16,)  # below the crop: allowed, rescaled to the crop


def test_unknown_method_lists_the_valid_ones(model):
    with pytest.raises(ValueError, match="'multi'.*center, dense, multicrop, multicrop\\+dense"):
        ev.evaluate([make_run(model)], records_of([], []), "multi")


def test_fusion_of_different_class_counts_is_refused(model):
    five = vgg_keras.build_vgg("A", num_classes=5, input_shape=(CROP, CROP, 3), init="glorot", seed=0)
    runs = [make_run(model, path="runs/three"), Run(path="runs/five", model=five, class_names=list("abcde"),
                                                    stats=IMAGENET_STATS, scale=(40, 48), crop=CROP, config={})]
    with pytest.raises(ValueError, match="runs/three \\(3 classes\\).*runs/five \\(5 classes\\)"):
        ev.make_members(runs)


def test_a_bare_model_needs_scales(model):
    bare = Run(path="model.keras", model=model, class_names=["0", "1", "2"], stats=IMAGENET_STATS, scale=None,
               crop=CROP, config={})
    with pytest.raises(ValueError, match="model.keras: no training scale.*--scales"):
        ev.make_members([bare])
    assert ev.make_members([bare], scales=(32,))[0].config == model.name


# --- the command line ------------------------------------------------------------------------------------------

@pytest.fixture
def eval_data(tmp_path, rng):
    """A class-folder data set with train/ and val/: 2 val images per class, a 4:3 JPEG and an odd-sized PNG."""
    root = tmp_path / "data"
    for label in range(3):
        for split in ("train", "val"):
            (root / split / f"class_{label}").mkdir(parents=True)
        pixels = [tf.cast(random_image(rng, *size), tf.uint8) for size in [(40, 40), (60, 80), (30 + 7 * label, 45)]]
        (root / "train" / f"class_{label}" / "t.png").write_bytes(tf.io.encode_png(pixels[0]).numpy())
        (root / "val" / f"class_{label}" / "photo.jpg").write_bytes(tf.io.encode_jpeg(pixels[1]).numpy())
        (root / "val" / f"class_{label}" / "odd.png").write_bytes(tf.io.encode_png(pixels[2]).numpy())
    return root


def test_cli_evaluates_a_run_on_its_recorded_data(tmp_path, eval_data, capsys):
    from conftest import make_run_dir
    from vgg_keras.cli import main

    run = make_run_dir(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(eval_data), "seed": 0}))
    out, predictions = tmp_path / "report.json", tmp_path / "predictions.jsonl"
    assert not main(["eval", "--model", str(run), "--method", "multicrop+dense", "--out", str(out),
                     "--predictions", str(predictions)])  # None: success
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["data"] == str(eval_data) and report["split"] == "val" and report["images"] == 6
    assert report["models"][0]["test_scales"] == [40, 44, 48] and report["crops_per_image"] == 150
    assert [row["method"] for row in report["rows"]] == ["dense", "multicrop", "multicrop+dense"]
    table = (tmp_path / "report.md").read_text()
    assert table in printed and "| A | [40;48] | {40,44,48} | multicrop+dense |" in table
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert sorted(p["label"] for p in lines) == ["class_0", "class_0", "class_1", "class_1", "class_2", "class_2"]
    assert all(len(p["top3"]) == 3 for p in lines)

    assert not main(["eval", "--model", str(run), "--method", "center", "--scales", "32", "--no-flip",
                     "--limit", "2"])
    assert "| A | [40;48] | 32 | center |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--scales", "1.5"], "--scales '1.5': expected comma-separated positive integers"),
    (["--scales", ""], "--scales '': expected"),
    (["--method", "crops"], "--method 'crops': unknown evaluation method; valid methods: center, dense, multicrop"),
    (["--limit", "0"], "--limit 0: must be a positive"),
])
def test_cli_refuses_bad_flags(tiny_run, flags, message, capsys):
    from vgg_keras.cli import main

    assert main(["eval", "--model", str(tiny_run), "--data", "unused"] + flags) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_fuse_different_class_counts(tmp_path, eval_data, capsys):
    from conftest import make_run_dir
    from vgg_keras.cli import main

    three, five = make_run_dir(tmp_path / "three"), make_run_dir(tmp_path / "five", num_classes=5)
    assert main(["eval", "--model", str(three), "--model", str(five), "--data", str(eval_data)]) == 2
    assert f"cannot fuse {three} (3 classes) with {five} (5 classes)" in capsys.readouterr().err
    assert main(["eval", "--model", str(five), "--data", str(eval_data)]) == 2
    assert "classes are not those" in capsys.readouterr().err
