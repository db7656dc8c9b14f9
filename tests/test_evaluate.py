"""Evaluation (Section 3.2): grids, scales, dense vs FC, flips, fusion, errors and reports, on tiny models."""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf

import vgg_keras
from vgg_keras import evaluate as ev
from vgg_keras.data.images import center_crop, rescale
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
    assert scorer.rescaled_size(image, 16) == [32, 48]
    assert scorer.rescaled_size(image, 40) == [40, 60]
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


def softmax(scores, axis=-1):
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def score_maps_by_hand(model, image, q):
    """The dense net's score maps of the image rescaled to Q and of its mirror, numpy in and out: [2, h', w', c]."""
    x = rescale(image, q).numpy() - np.array(IMAGENET_STATS.mean_rgb, np.float32)
    return vgg_keras.fully_convolutional(model).predict(np.stack([x, x[:, ::-1]]), verbose=0)


def test_each_dense_order_follows_its_definition(model, rng):
    image = random_image(rng, 64, 96)
    maps = score_maps_by_hand(model, image, 64)
    assert maps.shape == (2, 2, 3, 3)  # a 2x3 score map: the orders differ
    average_first = softmax(maps.mean(axis=(1, 2))).mean(axis=0)  # the paper's: average the scores, then soft-max
    softmax_first = softmax(maps).mean(axis=(1, 2)).mean(axis=0)
    assert not np.allclose(average_first, softmax_first, atol=1e-5)
    np.testing.assert_allclose(ev.dense_scores(ev.ModelScorer(model), image, [64]), average_first, atol=1e-5)
    np.testing.assert_allclose(ev.dense_scores(ev.ModelScorer(model, softmax_first=True), image, [64]),
                               softmax_first, atol=1e-5)


def crop_posteriors_by_hand(model, image, q, boxes):
    """Posteriors of `model` averaged over the crops `boxes` (top, left) of the image rescaled whole to Q (numpy
    slicing) and their mirrors."""
    rescaled = rescale(image, q).numpy() - np.array(IMAGENET_STATS.mean_rgb, np.float32)
    crops = np.stack([rescaled[top:top + CROP, left:left + CROP] for top, left in boxes])
    return model.predict(np.concatenate([crops, crops[:, :, ::-1]]), verbose=0).mean(axis=0)


def test_center_and_multicrop_equal_crops_cut_by_hand(model, scorer, rng):
    image = random_image(rng, 64, 96)  # rescaled to Q = 48: 48 x 72, larger than the crop on both sides
    centre = crop_posteriors_by_hand(model, image, 48, [((48 - 32) // 2, (72 - 32) // 2)])
    np.testing.assert_allclose(ev.center_scores(scorer, image, [48]), centre, atol=1e-5)
    grid = [(top, left) for top in (0, 4, 8, 12, 16) for left in (0, 10, 20, 30, 40)]
    np.testing.assert_allclose(ev.multi_crop_scores(scorer, image, [48]),
                               crop_posteriors_by_hand(model, image, 48, grid), atol=1e-5)
    wrong_place = crop_posteriors_by_hand(model, image, 48, [(0, 0)])
    assert not np.allclose(wrong_place, centre, atol=1e-4)  # the position matters: the comparison means something


@pytest.mark.parametrize("size, window", [((48, 72), (4, 10, 32, 32)), ((20, 9000), (0, 4000, 20, 100)),
                                          ((200, 300), (150, 7, 50, 60)), ((48, 72), (0, 0, 48, 72))])
def test_rescaled_window_equals_slicing_the_whole_rescaled_image(rng, size, window):
    image = random_image(rng, 64, 96) if size[1] < 1000 else random_image(rng, 8, 3600)  # down, up, a banner
    whole = tf.image.resize(image, size, antialias=True).numpy()
    top, left, height, width = window
    part = ev.rescaled_window(image, size, window).numpy()
    # float32 sample positions: off by ~1e-7 of the coordinate (thousands of pixels in a banner), on random pixels
    atol = 0 if (height, width) == size else 1e-7 * max(size) * 255
    np.testing.assert_allclose(part, whole[top:top + height, left:left + width], atol=atol)


def test_crop_methods_rescale_only_what_their_crops_need(scorer, rng, monkeypatch):
    windows = []
    real = ev.rescaled_window
    monkeypatch.setattr(ev, "rescaled_window", lambda image, size, window: windows.append(
        (list(size), list(window))) or real(image, size, window))
    banner = random_image(rng, 4, 2048)  # 32 x 16384 at Q = 32: 5 crop columns far apart
    ev.multi_crop_scores(scorer, banner, [32])
    assert [size for size, _ in windows] == [[32, 16384]] * 5
    assert [window for _, window in windows] == [[0, left, 32, 32] for left in (0, 4088, 8176, 12264, 16352)]
    windows.clear()
    ev.center_scores(scorer, random_image(rng, 300, 400), [40])  # 40 x 53: the central 32 x 32 only
    assert windows == [([40, 53], [4, 10, 32, 32])]
    windows.clear()
    ev.multi_crop_scores(scorer, random_image(rng, 40, 60), [40])  # overlapping crops: the image in one piece
    assert windows == [([40, 60], [0, 0, 40, 60])]


def test_bounded_view_keeps_each_dense_view_within_max_pixels():
    def view(height, width, q, crop=32, max_pixels=64 * 64):
        return [np.asarray(v).tolist() for v in ev.bounded_view(height, width, q, crop, max_pixels)]

    assert view(48, 64, 48) == [48, [48, 64], [0, 0, 48, 64]]  # within the bound: the whole image at Q
    assert view(3000, 4000, 256) == [55, [55, 73], [0, 0, 55, 73]]  # the largest Q that fits: 55 x 73 <= 4096
    assert view(3000, 4000, 256, max_pixels=56 * 75)[0] == 56
    assert view(8, 4096, 256) == [32, [32, 16384], [0, 8128, 32, 128]]  # not even Q = crop fits: the middle 128 px
    assert view(4096, 8, 256) == [32, [16384, 32], [8128, 0, 128, 32]]
    assert view(40, 40, 16) == [32, [32, 32], [0, 0, 32, 32]]  # below the crop: at the crop, as always
    for height, width in [(3000, 4000), (37, 2000), (8, 4096), (511, 513), (1, 1000)]:
        for q in (32, 77, 256, 512):
            side, size, window = view(height, width, q, max_pixels=5000)
            assert window[2] * window[3] <= 5000 and side >= 32 and min(window[2:]) >= 32
            next_size = view(height, width, side + 1, max_pixels=10 ** 9)[1]
            assert side == max(q, 32) or next_size[0] * next_size[1] > 5000  # the largest Q that fits
    with pytest.raises(ValueError, match="--max-pixels 1000: below one 32x32 crop"):
        ev.bounded_view(40, 40, 40, 32, 1000)


def test_dense_maps_never_feed_the_net_more_than_max_pixels(model, rng):
    seen = []
    net = vgg_keras.fully_convolutional(model)
    record = lambda x: seen.append(tuple(x.shape)) or net(x)  # noqa: E731
    banner = random_image(rng, 4, 2048)
    maps = ev.dense_maps(record, banner, 256, IMAGENET_STATS.mean_rgb, CROP, True, max_pixels=4096)
    assert seen == [(2, 32, 128, 3)] and maps.shape == (2, 1, 4, 3)
    seen.clear()
    photo = random_image(rng, 300, 400)
    ev.dense_maps(record, photo, 300, IMAGENET_STATS.mean_rgb, CROP, max_pixels=4096)
    assert seen == [(2, 55, 73, 3)]
    seen.clear()
    ev.dense_maps(record, photo, 40, IMAGENET_STATS.mean_rgb, CROP)  # the default bound: 40 x 53 is far below it
    assert seen == [(2, 40, 53, 3)]


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


def test_fusion_averages_the_posteriors_of_different_models(model, rng):
    other = vgg_keras.build_vgg("A", num_classes=3, input_shape=(CROP, CROP, 3), init="glorot", seed=1)
    images = [random_image(rng, 48, 64), random_image(rng, 64, 40)]
    records = records_of(images, [2, 0])
    decoded = [tf.cast(tf.round(image), tf.float32) for image in images]  # as the PNGs decode
    boxes = [[(8, 16)], [(22, 8)]]  # the centre of 48 x 64 and of 77 x 48, the images rescaled to Q = 48
    by_model = [np.array([crop_posteriors_by_hand(m, image, 48, box) for image, box in zip(decoded, boxes)])
                for m in (model, other)]
    assert not np.allclose(by_model[0], by_model[1], atol=1e-3)  # two models that disagree
    report, fused = posteriors_of([make_run(model), make_run(other, path="other")], records, "center", scales=(48,))
    np.testing.assert_allclose(fused, (by_model[0] + by_model[1]) / 2, atol=1e-5)
    assert [row["fusion"] for row in report["rows"]] == [False, False, True]
    ranks = [np.sum(p >= p[label]) - 1 for p, label in zip(fused, [2, 0])]
    assert report["top1_error"] == 100 * np.mean(np.array(ranks) >= 1)


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
    fused = np.array([[p for _, p in sorted(json.loads(line)["top3"])]
                      for line in open(tmp_path / "predictions.jsonl")])
    wrong = np.argmax(fused, axis=1) != np.array([0, 1, 2, 1])  # class names sort as their indices: cat, dog, eel
    assert report["top1_error"] == pytest.approx(100 * wrong.mean())
    assert report["top5_error"] == 0.0  # 3 classes: the top-5 error counts nothing here

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


# --- bounded work: a banner and a 12-megapixel photo through `vgg-keras eval` -------------------------------------

BOUND = 4800  # --max-pixels of these tests: a 56 x 64 image at Q = 64 fits (64 x 73), a 4:3 one does not

# Steps run in one fresh process, each followed by its peak resident memory so far (ru_maxrss, KiB on Linux): the
# first step (a normal image) is the baseline, warm, and the next one's growth is what the large images cost.
EVAL_STEPS = """
import json, resource, sys
from vgg_keras import cli
for argv in json.loads(sys.argv[1]):
    assert not cli.main(argv)
    print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def peaks_mib(code, steps):
    """Peak resident memory (MiB) after each of `steps` (JSON-able), run by `code` in a fresh Python."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", code, json.dumps(steps)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(line.split()[1]) / 1024 for line in result.stdout.splitlines() if line.startswith("peak_kib")]


def synthetic_jpeg(height, width, seed=0):
    """A smooth colour image with a few edges, JPEG-encoded (a real-looking photo for the decoder)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    rgb = [127 + 120 * np.sin(x / (7 + 5 * i) + y / (11 + 3 * i) + phase[i]) for i in range(3)]
    rgb = np.stack(rgb, axis=-1) * ((x // 16 + y // 16) % 2 == 0)[..., None]
    return tf.io.encode_jpeg(rgb.astype(np.uint8), quality=90).numpy()


BANNER, PHOTO, NORMAL = (8, 4096), (3000, 4000), (56, 64)


def dense_net_allowance_mib(max_pixels, channels=64, live_tensors=4):
    """What the bound allows the dense net: each view (image and mirror) at most max_pixels pixels of block1's
    widest activation (64 float32 channels), a few such tensors alive at once."""
    return 2 * max_pixels * channels * 4 * live_tensors / 2 ** 20


def decode_allowance_mib(height, width):
    """Decoding an image whole (evaluation and serving do): uint8 and float32 copies, two of each in flight."""
    return 2 * height * width * (3 + 4 * 3) / 2 ** 20


def class_folders(root, images):
    """A class-folder data set whose val/class_i holds images[i] (bytes); train/ one tiny PNG per class."""
    for label, data in enumerate(images):
        for split in ("train", "val"):
            (root / split / f"class_{label}").mkdir(parents=True)
        (root / "val" / f"class_{label}" / "image.jpg").write_bytes(data)
        (root / "train" / f"class_{label}" / "t.jpg").write_bytes(synthetic_jpeg(40, 40, label))
    return root


def test_eval_dense_bounds_the_memory_of_a_banner_and_a_large_photo(tmp_path):
    from conftest import make_run_dir

    run = make_run_dir(tmp_path / "run")
    normal = synthetic_jpeg(*NORMAL)
    big = class_folders(tmp_path / "big", [synthetic_jpeg(*BANNER, 1), synthetic_jpeg(*PHOTO, 2), normal])
    small = class_folders(tmp_path / "small", [normal, normal, normal])
    steps = [["eval", "--model", str(run), "--data", str(data), "--method", "dense", "--scales", "64",
              "--max-pixels", str(BOUND), "--out", str(tmp_path / f"{name}.json"),
              "--predictions", str(tmp_path / f"{name}.jsonl")] for name, data in [("small", small), ("big", big)]]
    peaks = dict(zip(["small", "big"], peaks_mib(EVAL_STEPS, steps)))
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in peaks}
    report = reports["big"]
    assert report["images"] == 3 and not report["skipped"] and report["max_pixels"] == BOUND
    # Without the bound the banner would be 64 x 32768 (2.1 M pixels, ~1 GB per activation of block1 with its
    # mirror), the photo 64 x 85 = 5440 pixels: both are evaluated within 4800 pixels, and listed.
    banner_id, photo_id = (str(big / "val" / f"class_{i}" / "image.jpg") for i in (0, 1))
    assert sorted(report["bounded"]) == sorted([banner_id, photo_id])
    assert "8x4096 at Q=64: 64x32768 = 2097152 pixels > --max-pixels 4800; evaluated at Q=32 (32x16384), " \
           "its central 32x150" == report["bounded"][banner_id]
    assert report["bounded"][photo_id].endswith("evaluated at Q=60 (60x80)")
    assert "(2 above --max-pixels 4800" in (tmp_path / "big.md").read_text()
    # The normal image is evaluated as alone (its posteriors do not depend on the others), and is not bounded.
    by_id = {json.loads(line)["id"]: json.loads(line)["top3"] for line in (tmp_path / "big.jsonl").open()}
    alone = json.loads((tmp_path / "small.jsonl").open().readline())["top3"]
    np.testing.assert_allclose([p for _, p in sorted(by_id[str(big / "val" / "class_2" / "image.jpg")])],
                               [p for _, p in sorted(alone)], atol=1e-6)
    assert reports["small"]["bounded"] == {}
    allowed = decode_allowance_mib(*PHOTO) + dense_net_allowance_mib(BOUND) + 150  # + noise of the allocator
    # measured: ~150 MiB more; with --max-pixels 10**9 the banner alone takes ~1600 MiB more
    assert peaks["big"] - peaks["small"] < allowed, (peaks, allowed)


def test_cli_softmax_first_split_train_and_max_pixels(tmp_path, eval_data, capsys):
    from conftest import make_run_dir
    from vgg_keras.cli import main

    run = make_run_dir(tmp_path / "run")
    reports = {}
    for name, flags in [("default", []), ("softmax_first", ["--softmax-first"])]:
        out = tmp_path / f"{name}.json"
        assert not main(["eval", "--model", str(run), "--data", str(eval_data), "--split", "train", "--method",
                         "dense", "--scales", "64", "--out", str(out), "--predictions", str(tmp_path / f"{name}.jsonl"),
                         *flags])
        reports[name] = json.loads(out.read_text())
    assert reports["softmax_first"]["dense_order"] == "softmax, then spatial average"
    assert reports["default"]["dense_order"] == "spatial average, then softmax"
    assert all(r["split"] == "train" and r["images"] == 3 for r in reports.values())  # the 3 train images, not val
    # each order against its definition on the train image of class_0 (40 x 40, a 64 x 64 input: 2x2 score maps)
    image = tf.cast(tf.io.decode_png((eval_data / "train" / "class_0" / "t.png").read_bytes()), tf.float32)
    maps = score_maps_by_hand(vgg_keras.runs.load_run(str(run)).model, image, 64)
    expected = {"default": softmax(maps.mean(axis=(1, 2))).mean(axis=0),
                "softmax_first": softmax(maps).mean(axis=(1, 2)).mean(axis=0)}
    for name in reports:
        first = next(json.loads(line) for line in (tmp_path / f"{name}.jsonl").open() if "class_0" in line)
        np.testing.assert_allclose([p for _, p in sorted(first["top3"])], expected[name], atol=1e-5)
    assert main(["eval", "--model", str(run), "--data", str(eval_data), "--max-pixels", "100"]) == 2
    assert "--max-pixels 100: below one 32x32 crop (1024 pixels)" in capsys.readouterr().err


def test_a_bare_keras_file_with_a_linear_last_layer_evaluates(tmp_path, eval_data, capsys):
    from vgg_keras.cli import main

    linear = vgg_keras.build_vgg("A", num_classes=3, input_shape=(CROP, CROP, 3), init="glorot", seed=2,
                                 classifier_activation=None)
    bare = tmp_path / "bare.keras"
    linear.save(bare)
    assert main(["eval", "--model", str(bare), "--data", str(eval_data)]) == 2
    assert f"{bare}: no training scale recorded (a bare model file); pass --scales" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert not main(["eval", "--model", str(bare), "--data", str(eval_data), "--method", "center", "--scales", "40",
                     "--no-flip", "--out", str(out), "--predictions", str(tmp_path / "p.jsonl")])
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["models"][0]["config"] == linear.name
    # a linear `predictions` layer gives class scores: evaluation soft-maxes them
    photo = eval_data / "val" / "class_0" / "photo.jpg"  # 60 x 80: 40 x 53 at Q = 40, its centre at (4, 10)
    line = next(json.loads(line) for line in (tmp_path / "p.jsonl").open() if json.loads(line)["id"] == str(photo))
    image = tf.cast(tf.io.decode_jpeg(photo.read_bytes()), tf.float32)
    crop = (rescale(image, 40).numpy() - np.array(IMAGENET_STATS.mean_rgb, np.float32))[4:36, 10:42]
    scores = linear.predict(crop[None], verbose=0)[0]
    assert not np.isclose(scores.sum(), 1.0)  # scores, not posteriors
    names = {"class_0": 0, "class_1": 1, "class_2": 2}
    got = np.zeros(3)
    for name, p in line["top3"]:
        got[names[name]] = p
    np.testing.assert_allclose(got, softmax(scores), atol=1e-5)
