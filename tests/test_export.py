"""Export for TF Serving (issue 6): signatures, the session loader, dense evaluation in the graph, warm-up,
models.config, bad requests, atomic versions, and `vgg-keras predict`."""

import io
import os
import pathlib
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_run_dir
from PIL import Image
from test_evaluate import BANNER, BOUND, NORMAL, PHOTO, decode_allowance_mib, dense_net_allowance_mib, peaks_mib, \
    synthetic_jpeg

import vgg_keras
from vgg_keras import cli
from vgg_keras import export as export_module
from vgg_keras.data.images import decode_rgb, rescale
from vgg_keras.evaluate import ModelScorer, dense_scores
from vgg_keras.export import BYTES_SIGNATURE, IMAGES_SIGNATURE, OUTPUTS, WARMUP_FILE, export, versions
from vgg_keras.predict import predict
from vgg_keras.runs import load_run

BIN = pathlib.Path(sys.executable).parent
SCALES = (40, 48)  # the tiny run is trained at crop 32, S in [40, 48]
TOP_K = 2  # fewer than the tiny run's 3 classes: the top-k slicing is visible


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny run exported once through the command line, as saved_models/tiny/1."""
    root = tmp_path_factory.mktemp("export")
    run = make_run_dir(root / "run")
    out = root / "saved_models"
    status = cli.main(["export", "--model", str(run), "--name", "tiny", "--scales", ",".join(map(str, SCALES)),
                       "--top-k", str(TOP_K), "--out", str(out)])
    assert not status
    return types.SimpleNamespace(run=run, out=out, model_dir=out / "tiny", version=out / "tiny" / "1")


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported.version))


@pytest.fixture
def jpeg():
    return synthetic_jpeg(75, 100)


def saved_model_cli(*args):
    result = subprocess.run([str(BIN / "saved_model_cli"), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def session_run(version, signature, key, array, tmp_path):
    """Outputs of `saved_model_cli run`: TF1's session loader, the one TF Serving uses."""
    inputs, outdir = tmp_path / f"{signature}.npy", tmp_path / f"{signature}_out"
    np.save(inputs, array, allow_pickle=True)
    saved_model_cli("run", "--dir", version, "--tag_set", "serve", "--signature_def", signature,
                    "--inputs", f"{key}={inputs}", "--outdir", outdir)
    return {name: np.load(outdir / f"{name}.npy", allow_pickle=True) for name in OUTPUTS}


def direct_dense_posteriors(run, image, scales):
    """Section 3.2 written out in numpy around the Keras dense net: the definition the export must meet."""
    dense = vgg_keras.fully_convolutional(run.model)
    per_scale = []
    for q in scales:
        x = rescale(image, q).numpy() - np.array(run.stats.mean_rgb, np.float32)
        score_maps = dense.predict(np.stack([x, x[:, ::-1]]), verbose=0)
        scores = score_maps.mean(axis=(1, 2))
        posteriors = np.exp(scores - scores.max(-1, keepdims=True))
        per_scale.append((posteriors / posteriors.sum(-1, keepdims=True)).mean(axis=0))
    return np.mean(per_scale, axis=0)


def check_outputs(outputs, class_names, expected_probabilities):
    np.testing.assert_allclose(outputs["probabilities"], expected_probabilities, atol=1e-4)
    order = np.argsort(-outputs["probabilities"], axis=-1, kind="stable")[:, :TOP_K]
    np.testing.assert_array_equal(outputs["classes"], order)
    np.testing.assert_allclose(outputs["scores"], np.take_along_axis(outputs["probabilities"], order, -1))
    labels = [[label.decode() for label in row] for row in outputs["labels"]]
    assert labels == [[class_names[i] for i in row] for row in order]


def test_saved_model_cli_lists_both_serving_signatures(exported):
    shown = saved_model_cli("show", "--all", "--dir", exported.version)
    blocks = {block.split("']")[0]: block for block in shown.split("signature_def['")[1:]}
    expected_inputs = {BYTES_SIGNATURE: ("inputs['image_bytes']", "DT_STRING", "shape: (-1)\n"),
                       IMAGES_SIGNATURE: ("inputs['images']", "DT_FLOAT", "shape: (-1, -1, -1, 3)")}
    for signature, fragments in expected_inputs.items():
        block = blocks[signature]
        assert "Method name is: tensorflow/serving/predict" in block
        assert all(fragment in block for fragment in fragments), block
        outputs = {line.split("'")[1] for line in block.splitlines() if line.strip().startswith("outputs[")}
        assert outputs == set(OUTPUTS)
        assert not any(name.endswith("_bytes") for name in outputs)  # REST would base64-encode them


def test_session_loader_runs_both_signatures_as_dense_evaluation(exported, jpeg, tmp_path):
    run = load_run(str(exported.run))
    image = decode_rgb(jpeg)
    expected = dense_scores(ModelScorer.from_run(run), image, SCALES)
    np.testing.assert_allclose(direct_dense_posteriors(run, image, SCALES), expected, atol=1e-5)

    from_bytes = session_run(exported.version, BYTES_SIGNATURE, "image_bytes", np.array([jpeg], dtype=object),
                             tmp_path)
    from_pixels = session_run(exported.version, IMAGES_SIGNATURE, "images", image.numpy()[None], tmp_path)
    for outputs in (from_bytes, from_pixels):
        check_outputs(outputs, run.class_names, expected[None])


def test_images_of_different_sizes_share_a_request(loaded):
    files = [synthetic_jpeg(*size, seed) for seed, size in enumerate([(75, 100), (64, 48), (40, 90)])]
    sizes = {tuple(decode_rgb(data).shape) for data in files}
    assert len(sizes) > 1, "pick samples of different sizes"
    classify = loaded.signatures[BYTES_SIGNATURE]
    batch = classify(image_bytes=tf.constant(files))["probabilities"].numpy()
    one_by_one = [classify(image_bytes=tf.constant([data]))["probabilities"].numpy()[0] for data in files]
    np.testing.assert_allclose(batch, one_by_one, atol=1e-6)
    np.testing.assert_allclose(batch.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "WEBP"])
def test_png_gif_bmp_and_webp_are_decoded(loaded, rng, fmt):
    frames = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(2)]
    buffer = io.BytesIO()
    options = {"GIF": {"save_all": True, "append_images": frames[1:]}, "WEBP": {"lossless": True}}.get(fmt, {})
    frames[0].save(buffer, format=fmt, **options)
    data = buffer.getvalue()
    first_frame = tf.io.decode_image(data, channels=3, expand_animations=False)  # a GIF's first frame
    from_bytes = loaded.signatures[BYTES_SIGNATURE](image_bytes=tf.constant([data]))["probabilities"]
    from_pixels = loaded.signatures[IMAGES_SIGNATURE](images=tf.cast(first_frame, tf.float32)[None])["probabilities"]
    np.testing.assert_allclose(from_bytes.numpy(), from_pixels.numpy(), atol=1e-6)


@pytest.mark.parametrize("bad, why", [(b"plain text, not an image", "not a JPEG, PNG, GIF, BMP or WebP image"),
                                      (b"", "empty or unreadable file"),
                                      ("truncated", r"truncated JPEG \(no end-of-image marker\)")])
def test_bytes_that_are_no_image_fail_by_name_and_the_model_still_answers(loaded, jpeg, bad, why):
    bad = jpeg[:len(jpeg) // 2] if bad == "truncated" else bad
    classify = loaded.signatures[BYTES_SIGNATURE]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[1\]: " + why):
        classify(image_bytes=tf.constant([jpeg, bad]))
    outputs = classify(image_bytes=tf.constant([jpeg]))
    assert outputs["probabilities"].shape == (1, 3)
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(), 1.0, atol=1e-5)


def test_warmup_requests_read_back_and_replay(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    path = exported.version / WARMUP_FILE
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy()) for record in tf.data.TFRecordDataset(str(path))]
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request for log in logs}
    assert len(logs) == 2 and set(requests) == {BYTES_SIGNATURE, IMAGES_SIGNATURE}
    probabilities = []
    for signature, request in requests.items():
        assert request.model_spec.name == "tiny"
        inputs = {key: tf.constant(tf.make_ndarray(tensor)) for key, tensor in request.inputs.items()}
        outputs = loaded.signatures[signature](**inputs)
        assert set(outputs) == set(OUTPUTS)
        probabilities.append(outputs["probabilities"].numpy())
    assert probabilities[0].shape == (1, 3)
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-6)  # the same image both ways


def read_models_config(out):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = (pathlib.Path(out) / "models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return {entry.name: entry for entry in config.model_config_list.config}


def test_models_config_lists_every_exported_model(exported):
    entries = read_models_config(exported.out)
    assert list(entries) == ["tiny"]
    assert entries["tiny"].base_path == str(exported.model_dir.resolve())
    assert entries["tiny"].model_platform == "tensorflow"


def interrupt(*args):
    raise KeyboardInterrupt


def fail_writing(*args):
    raise OSError("disk full")


def file_contents(folder):
    return {path: path.read_bytes() for path in pathlib.Path(folder).rglob("*") if path.is_file()}


def test_versions_are_atomic_and_never_modified(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "saved_models"
    first = export(str(tiny_run), "m", scales=(32,), out=str(out))
    assert pathlib.Path(first) == out / "m" / "1"
    first_files = file_contents(first)

    # Interrupted just before the rename, and failing inside the write: no version 2, no temporary left.
    for target, name, replacement, error in [(os, "rename", interrupt, KeyboardInterrupt),
                                             (export_module, "write_warmup", fail_writing, OSError)]:
        with monkeypatch.context() as patch:
            patch.setattr(target, name, replacement)
            with pytest.raises(error):
                export(str(tiny_run), "m", scales=(32,), out=str(out))
        assert os.listdir(out / "m") == ["1"]

    (out / "m" / ".tmp-7-999999").mkdir()  # as a killed export leaves it
    (out / "empty").mkdir()  # a model folder without versions: not for TF Serving
    second = export(str(tiny_run), "m", scales=(32,), out=str(out))
    assert pathlib.Path(second) == out / "m" / "2" and versions(out / "m") == [1, 2]
    assert ".tmp-7-999999" in capsys.readouterr().err
    assert file_contents(first) == first_files
    assert list(read_models_config(out)) == ["m"]


def test_default_scales_and_name_follow_the_run(tmp_path):
    jittered = types.SimpleNamespace(scale=(256, 512), path="r", config={"config": "A-LRN"}, model=None)
    fixed = types.SimpleNamespace(scale=(384, 384), path="r", config={}, model=None)
    bare = types.SimpleNamespace(scale=None, path="model.keras", config={}, model=None)
    assert export_module.export_scales(jittered) == (256, 384, 512)
    assert export_module.export_scales(fixed) == (352, 384, 416)
    assert export_module.export_scales(bare, (300, 400)) == (300, 400)
    with pytest.raises(ValueError, match="model.keras.*pass --scales"):
        export_module.export_scales(bare)
    with pytest.raises(ValueError, match="--scales 0"):
        export_module.export_scales(jittered, (0,))
    assert export_module.default_name(jittered) == "vgg_a_lrn"


@pytest.mark.parametrize("flags, message", [(["--name", "../escape"], "--name '../escape'"),
                                            (["--top-k", "0"], "--top-k 0"),
                                            (["--scales", "40,x"], "--scales '40,x'")])
def test_export_refuses_bad_flags(tiny_run, tmp_path, capsys, flags, message):
    status = cli.main(["export", "--model", str(tiny_run), "--out", str(tmp_path / "out"), *flags])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mixed_precision_model_is_exported_in_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=0)
    finally:
        keras.config.set_dtype_policy(previous)
    exact = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=1)
    exact.set_weights(mixed.get_weights())
    copy = export_module.as_float32(mixed)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32) * 50
    np.testing.assert_allclose(copy.predict(x, verbose=0), exact.predict(x, verbose=0), atol=1e-6)
    assert export_module.as_float32(exact) is exact


def test_predict_command_answers_good_images_and_names_bad_ones(exported, loaded, tmp_path):
    good = [tmp_path / "wide.jpg", tmp_path / "tall.jpg"]
    for seed, (path, size) in enumerate(zip(good, [(60, 90), (80, 50)])):
        path.write_bytes(synthetic_jpeg(*size, seed))
    good = [str(path) for path in good]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    result = subprocess.run([str(BIN / "vgg-keras"), "predict", "--saved-model", str(exported.model_dir),
                             good[0], str(bad), str(missing), good[1]], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [lines[0], lines[TOP_K + 1]] == good and len(lines) == 2 * (TOP_K + 1)
    expected = loaded.signatures[BYTES_SIGNATURE](image_bytes=tf.constant([pathlib.Path(good[0]).read_bytes()]))
    label, score = expected["labels"].numpy()[0, 0].decode(), expected["scores"].numpy()[0, 0]
    assert lines[1].split() == ["1.", f"{score:.4f}", str(expected["classes"].numpy()[0, 0]), label]
    assert f"{bad}: not a JPEG, PNG, GIF, BMP or WebP image" in result.stderr
    assert f"{missing}: No such file or directory" in result.stderr


def test_predict_refuses_a_missing_version_and_a_larger_top_k(exported):
    with pytest.raises(FileNotFoundError, match="--version 7: .* holds versions 1"):
        predict(str(exported.model_dir), [], version=7)
    with pytest.raises(ValueError, match=f"--top-k 3: .* returns the top {TOP_K} classes"):
        predict(str(exported.model_dir), [], top_k=3)
    with pytest.raises(FileNotFoundError, match="no version folder"):
        predict(str(exported.out), [])


def test_predict_version_flag_picks_the_version(exported, jpeg, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg)
    printed = io.StringIO()
    assert predict(str(exported.model_dir), [str(image)], version=1, out=printed) == 0
    assert printed.getvalue().splitlines()[0] == str(image) and len(printed.getvalue().splitlines()) == TOP_K + 1
    # the command line passes --version through: a missing one is refused by name
    assert cli.main(["predict", "--saved-model", str(exported.model_dir), "--version", "7", str(image)]) == 2
    assert f"vgg-keras predict: error: --version 7: {exported.model_dir} holds versions 1" in capsys.readouterr().err


def test_models_config_lists_several_models_and_their_versions(tmp_path):
    out = tmp_path / "saved_models"
    runs = {"a": make_run_dir(tmp_path / "a"), "b": make_run_dir(tmp_path / "b", num_classes=4, seed=1)}
    for name in ("b", "a", "b"):  # b exported twice: one entry, two versions
        export(str(runs[name]), name, scales=(32,), out=str(out))
    entries = read_models_config(out)
    assert list(entries) == ["a", "b"]
    assert {name: entry.base_path for name, entry in entries.items()} == {
        name: str((out / name).resolve()) for name in ("a", "b")}
    assert versions(out / "a") == [1] and versions(out / "b") == [1, 2]
    classify = tf.saved_model.load(str(out / "b" / "2")).signatures[BYTES_SIGNATURE]
    assert classify(image_bytes=tf.constant([synthetic_jpeg(40, 50)]))["probabilities"].shape == (1, 4)


def test_a_bare_keras_file_and_a_linear_last_layer_export(tmp_path, jpeg):
    model = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=3,
                                classifier_activation=None)
    model.save(tmp_path / "bare.keras")
    with pytest.raises(ValueError, match="pass --scales"):
        export(str(tmp_path / "bare.keras"), "bare", out=str(tmp_path / "out"))
    version = export(str(tmp_path / "bare.keras"), "bare", scales=(40,), out=str(tmp_path / "out"))
    outputs = tf.saved_model.load(version).signatures[BYTES_SIGNATURE](image_bytes=tf.constant([jpeg]))
    run = load_run(str(tmp_path / "bare.keras"))
    assert run.class_names == ["0", "1", "2"]
    expected = direct_dense_posteriors(run, decode_rgb(jpeg), (40,))
    np.testing.assert_allclose(outputs["probabilities"].numpy()[0], expected, atol=1e-5)
    assert [label.decode() for label in outputs["labels"].numpy()[0]] == [str(i) for i in np.argsort(-expected)[:3]]


def test_a_mixed_precision_run_exports_the_float32_posteriors(tmp_path, jpeg):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # what --mixed-precision picks on a CPU
    try:
        run_dir = make_run_dir(tmp_path / "mixed", config="A-LRN")
    finally:
        keras.config.set_dtype_policy(previous)
    run = load_run(str(run_dir))
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in run.model.layers}  # saved and loaded so
    version = export(str(run_dir), "mixed", scales=(40, 48), out=str(tmp_path / "out"))
    outputs = tf.saved_model.load(version).signatures[BYTES_SIGNATURE](image_bytes=tf.constant([jpeg]))
    exact = export_module.as_float32(run.model)  # the same weights in float32
    expected = direct_dense_posteriors(types.SimpleNamespace(model=exact, stats=run.stats), decode_rgb(jpeg), (40, 48))
    np.testing.assert_allclose(outputs["probabilities"].numpy()[0], expected, atol=1e-5)


# Both requests through TF1's session loader (what `saved_model_cli run` and TF Serving use), in one fresh process.
SERVING_STEPS = """
import json, resource, sys
import numpy as np
import vgg_keras
import tensorflow as tf
version, requests = json.loads(sys.argv[1])
with tf.compat.v1.Session(graph=tf.Graph()) as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], version)
    signature = meta.signature_def["serving_default"]
    feed = signature.inputs["image_bytes"].name
    fetch = signature.outputs["probabilities"].name
    for paths in requests:
        answer = session.run(fetch, {feed: [open(path, "rb").read() for path in paths]})
        print("probabilities", json.dumps(answer.tolist()))
        print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


@pytest.mark.slow
def test_serving_bounds_the_memory_of_a_banner_and_a_large_photo(tmp_path):
    run = make_run_dir(tmp_path / "run")
    out = tmp_path / "saved_models"
    assert not cli.main(["export", "--model", str(run), "--name", "bounded", "--scales", "64", "--max-pixels",
                         str(BOUND), "--out", str(out)])
    version = out / "bounded" / "1"
    files = {name: tmp_path / f"{name}.jpg" for name in ("banner", "photo", "normal")}
    for seed, (name, size) in enumerate(zip(files, (BANNER, PHOTO, NORMAL))):
        files[name].write_bytes(synthetic_jpeg(*size, seed))
    request = [str(files[name]) for name in ("banner", "photo", "normal")]

    # One request with the three images: every one answered, the normal one as alone, through saved_model_cli.
    outputs = session_run(version, BYTES_SIGNATURE, "image_bytes",
                          np.array([files[name].read_bytes() for name in ("banner", "photo", "normal")],
                                   dtype=object), tmp_path)
    assert outputs["probabilities"].shape == (3, 3)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)

    peaks = peaks_mib(SERVING_STEPS, [str(version), [[str(files["normal"])], request]])
    allowed = decode_allowance_mib(*PHOTO) + dense_net_allowance_mib(BOUND) + 150  # + noise of the allocator
    assert peaks[1] - peaks[0] < allowed, (peaks, allowed)  # measured: ~100 MiB; unbounded the banner alone ~1.6 GiB

    run = load_run(str(run))
    alone = dense_scores(ModelScorer.from_run(run), decode_rgb(files["normal"].read_bytes()), (64,))
    np.testing.assert_allclose(outputs["probabilities"][2], alone, atol=1e-5)
    # and the banner and the photo exactly as `vgg-keras eval` evaluates them under the same bound
    bounded = ModelScorer.from_run(run, max_pixels=BOUND)
    for row, name in enumerate(("banner", "photo")):
        expected = dense_scores(bounded, decode_rgb(files[name].read_bytes()), (64,))
        np.testing.assert_allclose(outputs["probabilities"][row], expected, atol=1e-5)
