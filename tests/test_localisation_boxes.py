"""Boxes for localisation: the convention and IoU, the three box-file formats with bad boxes, boxes through the
training transform (rescale, crop, flip), the regression target, greedy merging and ILSVRC's top-k rule."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from test_data_fixtures import encode, exif_app1, with_segment
from vgg_keras import boxes as vb
from vgg_keras.data.pipeline import train_transform
from vgg_keras.data.stats import IMAGENET_STATS
from vgg_keras.localisation import localisation_errors

CLASSES = ["n01", "n02", "n03"]


def test_iou_continuous_and_ilsvrc_inclusive_convention():
    assert vb.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert vb.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert vb.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no pixel
    assert vb.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    # ILSVRC's devkit: inclusive pixels, area (x2 - x1 + 1) * (y2 - y1 + 1); boxes 0..9 and 5..14 overlap in 5 x 10
    # pixels of 100 + 100 - 50: the continuous IoU of the boxes converted as the readers do (+1 on the max side)
    assert vb.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / (100 + 100 - 50))
    # one pixel, xmin == xmax, is a 1x1 box, not empty
    assert vb.iou([3, 3, 4, 4], [3, 3, 4, 4]) == 1.0
    np.testing.assert_allclose(vb.tf_iou(tf.constant([[0., 0, 10, 10]]), tf.constant([[5., 0, 15, 10]])).numpy(),
                               [50 / 150], rtol=1e-6)


def test_demo_annotations_parser_counts_bad_boxes(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"classes": CLASSES, "images": [
        {"file": "train/n01/0000.jpg", "label": "n01", "width": 40, "height": 30, "box": [2, 3, 20, 25]},
        {"file": "val/n01/0000.jpg", "label": "n01", "width": 40, "height": 30, "box": [-5, 3, 50, 25]},
        {"file": "train/n02/0001.jpg", "label": "n02", "width": 40, "height": 30, "box": [20, 3, 10, 25]},
        {"file": "train/zz/0002.jpg", "label": "zebra", "width": 40, "height": 30, "box": [1, 1, 5, 5]},
        {"file": "train/n03/0003.jpg", "label": "n03", "width": 40, "height": 30, "box": ["a", 1, 5, 5]},
    ]}))
    boxes = vb.load_boxes(path, CLASSES)
    assert boxes.counts == {"boxes": 2, "clipped": 1, "skipped_unknown_class": 1, "skipped_empty": 1,
                            "skipped_malformed": 1}
    assert boxes.find("data/demo/train/n01/0000.jpg") == ((40, 30), [(0, [2, 3, 20, 25])])
    assert boxes.find("/x/val/n01/0000.png") == ((40, 30), [(0, [0, 3, 40, 25])])  # clipped to the frame
    assert boxes.find("/x/test/n01/0000.jpg") is None  # train/ and val/ 0000 are different images


def _voc(name, objects, size=(500, 375)):
    size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    return f"<annotation><filename>{name}</filename>{size_xml}" + "".join(
        f"<object><name>{wnid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>" for wnid, b in objects) + "</annotation>"


def test_voc_xml_folder_with_ilsvrc_quirks(tmp_path):
    (tmp_path / "n01").mkdir()
    (tmp_path / "n01" / "n01_1.xml").write_text(_voc("n01_1", [("n01", (0, 0, 99, 49)), ("n01", ("10.5", 5, 600, 50)),
                                                              ("n02", (80, 40, 20, 30)), ("n99", (1, 1, 5, 5))]))
    (tmp_path / "n01_2.xml").write_text(_voc("n01_2", [("n02", (-3, 1, 9, 9))], size=None))
    (tmp_path / "broken.xml").write_text("<annotation><object>")
    boxes = vb.load_boxes(tmp_path, CLASSES)
    assert boxes.counts == {"boxes": 3, "clipped": 2, "skipped_unknown_class": 1, "skipped_empty": 1,
                            "skipped_malformed": 1}
    frame, entries = boxes.find("train/n01/n01_1.JPEG")
    assert frame == (500, 375)
    assert entries == [(0, [0, 0, 100, 50]), (0, [10.5, 5, 500, 51])]  # inclusive -> +1; clipped at the <size>
    assert boxes.find("n01_2.JPEG") == (None, [(1, [0, 1, 10, 10])])
    # the <size> is the frame: on a 250 x 187.5 image the same box is half as large
    scaled = vb.to_image_frame(tf.constant([0., 0, 100, 50]), tf.constant([500., 375]), tf.constant([187, 250]))
    np.testing.assert_allclose(scaled.numpy(), [0, 0, 50, 50 * 187 / 375], rtol=1e-6)


def test_kaggle_csv(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\n"
                    "ILSVRC2012_val_00000001,n01 10 20 30 40 n02 0 0 5 5 \n"
                    "ILSVRC2012_val_00000002,n03 -4 0 10 10 n77 1 1 2 2\n"
                    "ILSVRC2012_val_00000003,n01 1 2 3\n")
    boxes = vb.load_boxes(path, CLASSES)
    assert boxes.counts == {"boxes": 3, "clipped": 1, "skipped_unknown_class": 1, "skipped_empty": 0,
                            "skipped_malformed": 1}
    assert boxes.find("val/ILSVRC2012_val_00000001.JPEG") == (None, [(0, [10, 20, 31, 41]), (1, [0, 0, 6, 6])])
    assert boxes.find("ILSVRC2012_val_00000002") == (None, [(2, [0, 0, 11, 11])])


def test_load_boxes_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        vb.load_boxes(tmp_path / "nowhere.json", CLASSES)
    (tmp_path / "boxes.txt").write_text("x")
    with pytest.raises(ValueError, match="boxes.txt"):
        vb.load_boxes(tmp_path / "boxes.txt", CLASSES)
    (tmp_path / "empty.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(ValueError, match="no usable box"):
        vb.load_boxes(tmp_path / "empty.csv", CLASSES)


def test_window_round_trip_on_hand_cases():
    # window [top, left, height, width] = [10, 20, 40, 80] of the image, resized to a 32 x 32 crop
    window = tf.constant([10, 20, 40, 80])
    box = tf.constant([[20., 10, 100, 50], [60, 30, 80, 40]])
    in_crop = vb.window_to_crop(box, window, 32, tf.constant(False))
    np.testing.assert_allclose(in_crop.numpy(), [[0, 0, 32, 32], [16, 16, 24, 24]])
    flipped = vb.window_to_crop(box, window, 32, tf.constant(True))
    np.testing.assert_allclose(flipped.numpy(), [[0, 0, 32, 32], [8, 16, 16, 24]])
    for mirror in (False, True):
        back = vb.crop_to_window(vb.window_to_crop(box, window, 32, tf.constant(mirror)), window, 32,
                                 tf.constant(mirror))
        np.testing.assert_allclose(back.numpy(), box.numpy(), rtol=1e-6)
    params = vb.to_center_size(in_crop, 32)
    np.testing.assert_allclose(params.numpy(), [[0.5, 0.5, 1, 1], [0.625, 0.625, 0.25, 0.25]])
    np.testing.assert_allclose(vb.from_center_size(params, 32).numpy(), in_crop.numpy(), rtol=1e-6)


def test_crop_target_keeps_the_most_visible_box_and_zero_weights_hidden_ones():
    boxes = tf.constant([[-30., 0, 10, 10], [4, 4, 20, 20], [0, 0, 0, 0]])  # visible: 100 and 256 pixels
    target, weight = vb.crop_target(boxes, tf.constant([2, 1, -1]), 32)
    np.testing.assert_allclose(target.numpy(), [1, 0.375, 0.375, 0.5, 0.5])
    assert weight.numpy() == 1.0
    target, weight = vb.crop_target(tf.constant([[-30., 0, 10, 32]]), tf.constant([0]), 32)  # 1/4 visible
    assert weight.numpy() == 0.0
    np.testing.assert_allclose(target.numpy(), [0, -10 / 32, 0.5, 40 / 32, 1])  # unclipped: the whole object


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _phone_jpeg(image):
    """JPEG bytes stored rotated, with EXIF Orientation 6 (turn 90 degrees clockwise): a viewer shows `image`."""
    stored = np.asarray(Image.fromarray(image).transpose(Image.ROTATE_90))
    return with_segment(encode(stored, quality=95, subsampling=0), exif_app1(6))


@pytest.mark.parametrize("seed, fmt", [(0, "png"), (1, "png"), (2, "png"), (3, "png"), (4, "png"), (5, "png"),
                                       (0, "phone"), (3, "phone")])
def test_box_target_sees_the_pixels_of_the_training_crop(seed, fmt):
    """A white rectangle on black: the target box of a training crop (rescale to S, window, flip) is where the
    crop's white pixels are; boxes are in the displayed image's frame (a phone JPEG's EXIF orientation applied)."""
    image = np.zeros((60, 90, 3), np.uint8)
    image[20:44, 30:66] = 255  # box [30, 20, 66, 44]
    data = tf.constant(_png(image) if fmt == "png" else _phone_jpeg(image))
    assert list(vb.image_shape(data).numpy()) == [60, 90]
    seed_pair = tf.constant([seed, 0], tf.int64)
    pixels = train_transform(data, seed_pair, (40, 56), 32, IMAGENET_STATS, color_shift=False).numpy()
    white = pixels.mean(-1) + np.mean(IMAGENET_STATS.mean_rgb) > 127
    target, weight = vb.train_box_target(data, seed_pair, tf.constant([[30., 20, 66, 44]]), tf.constant([0]),
                                         tf.constant([0., 0]), (40, 56), 32)
    box = vb.from_center_size(target[1:], 32).numpy()
    rows, cols = np.nonzero(white)
    if weight.numpy() == 0:
        return
    found = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    expected = np.clip(box, 0, 32)
    np.testing.assert_allclose(found, expected, atol=1.01)


def test_merge_on_hand_made_boxes():
    close = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]]
    far = [[50, 50, 60, 60], [51, 50, 61, 60]]
    merged, support = vb.merge_boxes(tf.constant(close + far, tf.float32), 0.5)
    assert support.numpy().tolist() == [3, 2]
    np.testing.assert_allclose(merged.numpy(), [[1 / 3, 1 / 3, 31 / 3, 31 / 3], [50.5, 50, 60.5, 60]], rtol=1e-5)
    np.testing.assert_allclose(vb.best_merged_box(tf.constant(close + far, tf.float32)).numpy(),
                               [1 / 3, 1 / 3, 31 / 3, 31 / 3], rtol=1e-5)
    # a threshold above every IoU merges nothing; IoU of [0,10] and [1,11] is 9/11
    merged, support = vb.merge_boxes(tf.constant(close[:2], tf.float32), 0.9)
    assert support.numpy().tolist() == [1, 1]
    merged, support = vb.merge_boxes(tf.constant(close[:2], tf.float32), 0.8)
    assert support.numpy().tolist() == [2]
    merged, support = vb.merge_boxes(tf.zeros([0, 4]), 0.5)
    assert merged.shape == (0, 4)
    merged, support = vb.merge_boxes(tf.constant([[1., 2, 3, 4]]), 0.5)
    assert support.numpy().tolist() == [1]


def test_top5_rule_with_two_ground_truth_boxes():
    gt_labels, gt_boxes = [1, 1], [[0, 0, 10, 10], [20, 20, 40, 40]]
    good_second = {1: [21, 21, 40, 40], 0: [0, 0, 10, 10], 2: [0, 0, 10, 10]}
    # class 1 is the second guess; its box matches the *second* ground-truth box
    assert localisation_errors([0, 1, 2], good_second, gt_labels, gt_boxes) == {1: 1, 5: 0}
    assert localisation_errors([1, 0, 2], good_second, gt_labels, gt_boxes) == {1: 0, 5: 0}
    # the right class with a box between the two ground truths, IoU < 0.5 with each: wrong
    between = {1: [5, 5, 25, 25], 0: [0, 0, 10, 10]}
    assert localisation_errors([1, 0], between, gt_labels, gt_boxes) == {1: 1, 5: 1}
    # a perfect box of a wrong class does not count
    assert localisation_errors([0], {0: [0, 0, 10, 10]}, gt_labels, gt_boxes) == {1: 1, 5: 1}
