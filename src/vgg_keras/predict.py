"""`vgg-keras predict`: classify image files with an exported SavedModel, through the signature TF Serving
serves (`serving_default`, encoded image bytes in), loaded with tf.saved_model.load.

The BMP variants and animated WebPs the serving graph cannot decode (1/2/4/16-bit, RLE, BI_BITFIELDS; see
data/decode.py) are re-encoded as PNG by Pillow here, before the request, as a client of TF Serving would."""

import os
import re
import sys

import tensorflow as tf

from .data.decode import PILLOW_ONLY, bad_file_reason, error_line, transcode
from .export import BYTES_SIGNATURE, versions



def version_dir(saved_model, version=None):
    """The folder of `version` (default: the highest) of saved_models/NAME; a version folder itself is
    accepted too when no version is asked for."""
    if version is None and os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
        return saved_model
    present = versions(saved_model)
    if not present:
        raise FileNotFoundError(f"--saved-model {saved_model}: no version folder there "
                                "(expected saved_models/NAME as written by `vgg-keras export`)")
    if version is None:
        version = present[-1]
    elif version not in present:
        raise FileNotFoundError(f"--version {version}: {saved_model} holds versions "
                                f"{', '.join(map(str, present))}")
    return os.path.join(saved_model, str(version))


def error_message(err):
    """The useful line of a failed request (the caller names the file)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    assertion = re.search(r"assertion failed: \[(.*)\]", err.message)  # greedy: the message has [i]
    if assertion:
        return assertion.group(1).replace("image_bytes[0]: ", "")  # one image per request: no index
    return error_line(err.message)


def classify_file(signature, path):
    """The signature's outputs for one image file, batch dimension removed."""
    with open(path, "rb") as f:
        image_bytes = f.read()
    if int(bad_file_reason(tf.constant(image_bytes))) == PILLOW_ONLY:
        image_bytes = transcode(image_bytes)
    outputs = signature(image_bytes=tf.constant([image_bytes]))
    return {key: value.numpy()[0] for key, value in outputs.items()}


def format_prediction(path, outputs, top_k):
    rows = zip(outputs["classes"][:top_k], outputs["scores"][:top_k], outputs["labels"][:top_k])
    lines = [f"{path}"] + [f"  {rank}. {score:.4f}  {index:>4}  {label.decode('utf-8', 'replace')}"
                           for rank, (index, score, label) in enumerate(rows, start=1)]
    return "\n".join(lines)


def predict(saved_model, images, version=None, top_k=None, out=sys.stdout, err=sys.stderr):
    """Print the top-k classes of each image file; returns how many could not be classified.

    A file that cannot be read or is not an image is reported on `err` and the others are still answered.
    top_k: at most the k the model was exported with (its default).
    """
    path = version_dir(saved_model, version)
    loaded = tf.saved_model.load(path)  # kept referenced: its signatures read its variables
    signature = loaded.signatures[BYTES_SIGNATURE]
    exported_k = signature.structured_outputs["scores"].shape[-1]
    top_k = exported_k if top_k is None else top_k
    if not 1 <= top_k <= exported_k:
        raise ValueError(f"--top-k {top_k}: {path} returns the top {exported_k} classes "
                         f"(re-export with `vgg-keras export --top-k {top_k}` for more)")
    failures = 0
    for image in images:
        try:
            print(format_prediction(image, classify_file(signature, image), top_k), file=out)
        except (OSError, tf.errors.InvalidArgumentError) as failure:
            print(f"vgg-keras predict: {image}: {error_message(failure)}", file=err)
            failures += 1
    return failures
