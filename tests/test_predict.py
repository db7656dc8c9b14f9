"""`vgg-keras predict` on real-world files: the BMP variants the serving graph cannot decode are converted before
the request, a phone photo is classified as displayed, and a file TensorFlow refuses is named with the reason line
(never `<stack traces unavailable>`). Inputs are built here; one tiny export is shared by the module."""

import io

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_run_dir
from PIL import Image
from test_data_fixtures import bmp, encode, exif_app1, noise, with_segment

from vgg_keras import cli
from vgg_keras.export import BYTES_SIGNATURE
from vgg_keras.predict import classify_file, predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    assert not cli.main(["export", "--model", str(make_run_dir(root / "run")), "--name", "tiny", "--scales", "40",
                         "--top-k", "3", "--out", str(root / "saved_models")])
    return root / "saved_models" / "tiny"


@pytest.fixture(scope="module")
def signature(exported):
    loaded = tf.saved_model.load(str(exported / "1"))
    signature = loaded.signatures[BYTES_SIGNATURE]
    signature.loaded = loaded  # keep its variables alive
    return signature


def test_bmp_variants_are_converted_before_the_request(signature, tmp_path):
    palette = np.random.default_rng(1).integers(0, 256, (16, 3))
    indices = np.random.default_rng(2).integers(0, 16, (40, 44))
    (tmp_path / "four_bit.bmp").write_bytes(bmp(indices, palette, 4))
    (tmp_path / "same.png").write_bytes(encode(palette[indices], "PNG"))
    got = classify_file(signature, str(tmp_path / "four_bit.bmp"))
    np.testing.assert_allclose(got["probabilities"], classify_file(signature, str(tmp_path / "same.png"))
                               ["probabilities"], atol=1e-6)


def test_a_phone_photo_is_classified_as_displayed(signature, tmp_path):
    plain = encode(noise(48, 64), quality=95, subsampling=0)
    (tmp_path / "phone.jpg").write_bytes(with_segment(plain, exif_app1(6)))
    shown = np.asarray(Image.fromarray(tf.io.decode_jpeg(plain).numpy()).transpose(Image.ROTATE_270))
    (tmp_path / "shown.png").write_bytes(encode(shown, "PNG"))
    (tmp_path / "sideways.png").write_bytes(encode(tf.io.decode_jpeg(plain).numpy(), "PNG"))
    phone = classify_file(signature, str(tmp_path / "phone.jpg"))["probabilities"]
    np.testing.assert_allclose(phone, classify_file(signature, str(tmp_path / "shown.png"))["probabilities"],
                               atol=1e-6)
    assert np.abs(phone - classify_file(signature, str(tmp_path / "sideways.png"))["probabilities"]).max() > 1e-6


def test_a_refused_file_is_named_with_its_reason(exported, tmp_path):
    good = encode(noise(40, 48))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good[:3] + b"\0" * 300 + good[303:])  # passes the byte check, fails to decode
    (tmp_path / "good.jpg").write_bytes(good)
    out, err = io.StringIO(), io.StringIO()
    assert predict(str(exported), [str(corrupt), str(tmp_path / "good.jpg")], out=out, err=err) == 1
    (line,) = err.getvalue().splitlines()
    assert line.startswith(f"vgg-keras predict: {corrupt}: ") and "stack traces" not in line
    assert "JPEG" in line or "jpeg" in line, line  # TensorFlow's reason line
    assert out.getvalue().splitlines()[0] == str(tmp_path / "good.jpg")
