"""Export a trained run as a TensorFlow Serving SavedModel that does the paper's dense evaluation.

    saved_models/models.config                 ModelServerConfig (text proto) listing every exported model
    saved_models/NAME/<version>/               one SavedModel per export, version = highest present + 1
        assets.extra/tf_serving_warmup_requests   one PredictionLog per signature, replayed by TF Serving

Signatures (method `tensorflow/serving/predict`):
    serving_default   image_bytes: string [-1] (JPEG, PNG, GIF first frame, BMP, WebP)
    predict_images    images: float32 [-1, H, W, 3], RGB 0-255
both returning probabilities [-1, classes], and the top-k `classes` (indices), `scores` and `labels`.

Section 3.2 in the graph, by the very function `vgg-keras eval` runs (`evaluate.dense_posteriors`): for each
test scale Q, rescale isotropically (smallest side Q), subtract the mean RGB, run the fully-convolutional net on
the image and its horizontal flip, average each class score map spatially, softmax, average the two posteriors;
then average the posteriors over the scales. As in `vgg-keras eval`, a test scale below the training crop is
evaluated at the crop, and one view never exceeds `max_pixels` pixels (`evaluate.bounded_view`: above it the
largest Q that fits, a banner's central part at Q = crop), so every image of a request is answered with bounded
memory and the server keeps serving.

Entry point: `export()` (`vgg-keras export`, `make export`); `vgg-keras predict` reads the result.
"""

import contextlib
import os
import re
import shutil
import sys

import keras
import numpy as np
import tensorflow as tf

from .data.decode import OK, REASONS, bad_file_reason
from .data.images import decode_rgb
from .evaluate import DEFAULT_MAX_PIXELS, check_max_pixels, dense_posteriors, test_scales
from .model import fully_convolutional
from .runs import Run, load_run

SAVED_MODELS = "saved_models"
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
BYTES_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
DEFAULT_TOP_K = 5
OUTPUTS = ("probabilities", "classes", "scores", "labels")  # none ends in _bytes: REST would base64 it

_VERSION = re.compile(r"[0-9]+")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in a path and in /v1/models/NAME


# ---------------------------------------------------------------------------------------------------
# The serving graph


def checked_decode(image_bytes, index):
    """decode_rgb (as a viewer shows the image: JPEG EXIF orientation, BMP palettes; data/images.py), after the data
    pipeline's check of the bytes: a bad element fails the request with a message that names it and says why (not
    an image, empty, truncated, or a BMP variant / animated WebP that only Pillow decodes, which a serving graph
    cannot hold: `vgg-keras predict` converts those before the request)."""
    reason = bad_file_reason(image_bytes)
    why = tf.gather(tf.constant([REASONS.get(code, "") for code in range(max(REASONS) + 1)]), reason)
    message = tf.strings.join(["image_bytes[", tf.strings.as_string(index), "]: ", why])
    check = tf.debugging.Assert(tf.equal(reason, OK), [message])
    with tf.control_dependencies([check]):  # decode only after the check: its error is the clear one
        return decode_rgb(image_bytes)


class DenseServing:
    """The two serving functions around a dense-evaluation net; class names and mean RGB as constants."""

    def __init__(self, model, class_names, mean_rgb, scales, top_k, max_pixels=DEFAULT_MAX_PIXELS):
        self.dense_model = fully_convolutional(model)
        self.num_classes = self.dense_model.output_shape[-1]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model with {self.num_classes} classes")
        self._class_names = [str(name) for name in class_names]
        self._mean_rgb = [float(v) for v in mean_rgb]
        self._crop = int(model.input_shape[1])
        self._scales = [int(q) for q in scales]
        self._max_pixels = check_max_pixels(max_pixels, self._crop)
        self.top_k = min(int(top_k), self.num_classes)

    def _per_image(self, fn, elements):
        spec = tf.TensorSpec([self.num_classes], tf.float32)  # images differ in size: one at a time
        return tf.map_fn(fn, elements, fn_output_signature=spec)

    def _outputs(self, probabilities):
        scores, classes = tf.math.top_k(probabilities, k=self.top_k)
        labels = tf.gather(tf.constant(self._class_names), classes)  # a constant of the graph
        return {"probabilities": probabilities, "classes": classes, "scores": scores, "labels": labels}

    def _posteriors(self, image):
        return tf.reduce_mean(tf.stack([
            dense_posteriors(self.dense_model, image, q, self._mean_rgb, self._crop, max_pixels=self._max_pixels)
            for q in self._scales]), axis=0)

    def classify_bytes(self, image_bytes):
        indices = tf.range(tf.size(image_bytes))
        probabilities = self._per_image(lambda e: self._posteriors(checked_decode(*e)), (image_bytes, indices))
        return self._outputs(probabilities)

    def classify_images(self, images):
        return self._outputs(self._per_image(self._posteriors, images))

    def endpoints(self):
        """{signature name: traced tf.function}, XLA off: the serving CPU/GPU kernels, any input size."""
        specs = {
            BYTES_SIGNATURE: (self.classify_bytes, tf.TensorSpec([None], tf.string, name="image_bytes")),
            IMAGES_SIGNATURE: (self.classify_images, tf.TensorSpec([None, None, None, 3], tf.float32,
                                                                   name="images")),
        }
        functions = {}
        for name, (fn, spec) in specs.items():
            functions[name] = tf.function(fn, input_signature=[spec], jit_compile=False)
            functions[name].get_concrete_function()  # traced: ExportArchive takes it as it is
        return functions


# ---------------------------------------------------------------------------------------------------
# Writing a version


@contextlib.contextmanager
def float32_policy():
    """Layers created inside (the dense net's FC-as-conv layers) compute in float32."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def as_float32(model):
    """`model` when every layer computes in float32, else a float32 copy sharing nothing (same weights).

    A mixed-precision run would otherwise export float16 kernels: slower on CPU, and not the
    posteriors that evaluation reports.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float32"
    with float32_policy():
        copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def sample_jpeg(height=48, width=64):
    """A small deterministic colour gradient, JPEG-encoded: the warm-up requests' image."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 128.0)], axis=-1).astype(np.uint8)
    return tf.io.encode_jpeg(rgb).numpy()


def warmup_records(model_name, image_bytes):
    """Serialized PredictionLog records: one PredictRequest per signature, for the same image."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    images = decode_rgb(image_bytes)[tf.newaxis]
    inputs = {BYTES_SIGNATURE: ("image_bytes", tf.make_tensor_proto([image_bytes], dtype=tf.string)),
              IMAGES_SIGNATURE: ("images", tf.make_tensor_proto(images.numpy(), dtype=tf.float32))}
    records = []
    for signature, (key, tensor) in inputs.items():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        request.inputs[key].CopyFrom(tensor)
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def write_warmup(saved_model_dir, model_name):
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in warmup_records(model_name, sample_jpeg()):
            writer.write(record)


def write_saved_model(path, run, model_name, scales, top_k, max_pixels=DEFAULT_MAX_PIXELS, extend=None):
    """The SavedModel of `run` at `path`: Keras's ExportArchive, whose variables the session loader of
    TF Serving finds (a raw tf.saved_model.save of Keras 3 variables fails there), plus the warm-up.
    extend(archive, serving, scales): adds more signatures (localisation.localise_extension)."""
    with float32_policy():
        serving = DenseServing(as_float32(run.model), run.class_names, run.stats.mean_rgb, scales, top_k, max_pixels)
        archive = keras.export.ExportArchive()
        archive.track(serving.dense_model)
        for name, fn in serving.endpoints().items():
            archive.add_endpoint(name, fn)
        if extend is not None:
            extend(archive, serving, serving._scales)
        archive.write_out(path, verbose=False)
    write_warmup(path, model_name)


# ---------------------------------------------------------------------------------------------------
# Versions, the models.config, the entry point


def versions(model_dir):
    """The integer versions under saved_models/NAME, ascending (TF Serving reads only numeric folders)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(entry) for entry in os.listdir(model_dir)
                  if _VERSION.fullmatch(entry) and os.path.isdir(os.path.join(model_dir, entry)))


def models_config_text(out):
    """ModelServerConfig text proto: every folder of `out` holding a version, with its absolute path."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.SetInParent()  # an empty list, not an absent one, when nothing is exported
    for name in sorted(os.listdir(out)):
        base_path = os.path.abspath(os.path.join(out, name))
        if versions(base_path):
            entry = config.model_config_list.config.add()
            entry.name, entry.base_path, entry.model_platform = name, base_path, "tensorflow"
    return text_format.MessageToString(config)


def write_models_config(out):
    """Regenerate out/models.config atomically: a server reloading it never reads half a file."""
    path = os.path.join(out, MODELS_CONFIG)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(models_config_text(out))
    os.replace(tmp, path)
    return path


def default_name(run):
    """vgg_<config> (e.g. vgg_a_lrn) for a run directory, the model's own name for a bare file."""
    config = run.config.get("config")
    name = f"vgg_{config}" if config else run.model.name
    return re.sub(r"[^a-z0-9_]", "_", name.lower())


def export_scales(run, scales=None):
    """`scales` (positive integers), or the paper's test scales for the run's training scale."""
    if scales is None:
        if run.scale is None:
            raise ValueError(f"{run.path}: a bare model file does not record its training scale; pass --scales")
        return tuple(test_scales(run.scale))
    scales = tuple(int(q) for q in scales)
    if not scales or min(scales) < 1:
        raise ValueError(f"--scales {','.join(map(str, scales))}: expected one or more positive integers")
    return scales


def _warn_stale_temporaries(model_dir):
    stale = sorted(e for e in os.listdir(model_dir) if e.startswith(".tmp-"))
    if stale:
        print(f"vgg-keras export: note: {model_dir} holds unfinished exports {', '.join(stale)} "
              "(interrupted earlier; TF Serving ignores them, remove them when no export is running)",
              file=sys.stderr)


def export(model, name=None, scales=None, top_k=DEFAULT_TOP_K, out=SAVED_MODELS, max_pixels=DEFAULT_MAX_PIXELS,
           extend=None):
    """Export `model` (a run directory, a .keras file or a loaded Run) as out/NAME/<next version>/ and
    rewrite out/models.config. name: default vgg_<config>; scales: default the paper's test scales;
    max_pixels: the bound on one dense view in the graph (--max-pixels, `evaluate.bounded_view`).

    The version is built in out/NAME/.tmp-<version>-<pid> and renamed into place, so TF Serving only
    ever sees complete versions, an interrupted export leaves no numeric folder, and no existing
    version is touched. Returns the version's path.
    """
    run = model if isinstance(model, Run) else load_run(model)
    name = name or default_name(run)
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a folder and a URL)")
    if int(top_k) < 1:
        raise ValueError(f"--top-k {top_k}: must be at least 1")
    scales = export_scales(run, scales)
    check_max_pixels(max_pixels, run.model.input_shape[1])

    model_dir = os.path.join(out, name)
    os.makedirs(model_dir, exist_ok=True)
    _warn_stale_temporaries(model_dir)
    version = (versions(model_dir) or [0])[-1] + 1
    final = os.path.join(model_dir, str(version))
    tmp = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    try:
        write_saved_model(tmp, run, name, scales, top_k, max_pixels, extend)
        if os.path.exists(final):  # rename would replace an empty folder silently
            raise FileExistsError(f"{final} appeared during the export (another export of {name!r}?)")
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_models_config(out)
    return final
