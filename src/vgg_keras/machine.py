"""The CPU this process runs on, and the choice of TensorFlow's oneDNN kernels.

TensorFlow 2.21 turns its oneDNN (MKL) kernels on by default only on some Intel CPUs; elsewhere (AMD EPYC, for
one) it falls back to Eigen, whose convolution backward pass is 3-5x slower: a VGG training step takes 4x as long.
`choose_onednn()` runs when `vgg_keras` is imported, before anything imports TensorFlow, and turns oneDNN on for
x86 CPUs unless the user set `TF_ENABLE_ONEDNN_OPTS` themselves. TensorFlow reads the variable once, when it is
first imported: if something imported TensorFlow before `vgg_keras`, the choice comes too late, and where
TensorFlow's default left oneDNN off this module says so once, with the fix.

`cpu_line()` names the machine a time figure was measured on: CPU model, vector extensions, whether oneDNN is on,
and the thread settings.

Nothing here imports TensorFlow at module level: this module must run before it.
"""

import os
import platform
import sys
import warnings

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
X86 = ("x86_64", "amd64", "i386", "i686")

# How the variable came to have its value: "user" (set before vgg_keras was imported), "vgg-keras" (set here),
# "too-late" (TensorFlow was imported first, without it), or "not-x86".
onednn_choice = None


def choose_onednn():
    """Set TF_ENABLE_ONEDNN_OPTS=1 on x86 CPUs before TensorFlow is imported, unless the user chose; returns how
    the value was decided (see `onednn_choice`). Warns once (RuntimeWarning) when TensorFlow was imported first."""
    global onednn_choice
    if onednn_choice is not None:
        return onednn_choice
    if ONEDNN_VARIABLE in os.environ:
        onednn_choice = "user"
    elif platform.machine().lower() not in X86:
        onednn_choice = "not-x86"
    elif "tensorflow" in sys.modules:
        onednn_choice = "too-late"
        if onednn_enabled():  # TensorFlow's own default turned it on (it does on CPUs with AVX-512 VNNI, AMX)
            return onednn_choice
        warnings.warn(
            "TensorFlow was imported before vgg_keras, so vgg-keras could not turn on TensorFlow's oneDNN kernels "
            "(on CPUs where TensorFlow leaves them off, training runs 3-5x slower). Import vgg_keras first, or set "
            f"{ONEDNN_VARIABLE}=1 in the environment.", RuntimeWarning, stacklevel=3)
    else:
        os.environ[ONEDNN_VARIABLE] = "1"
        onednn_choice = "vgg-keras"
    return onednn_choice


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN kernels in this process (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port  # the only place TensorFlow exposes it

    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_info(cpuinfo_path="/proc/cpuinfo"):
    """{"model": str, "extensions": [str], "cores": int}: the CPU model name, which of AVX2 / AVX-512 / AMX it
    has (from /proc/cpuinfo's flags; empty where that file does not exist), and the cores this process may use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    extensions = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile"))
                  if flag in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "extensions": extensions, "cores": cores}


def thread_settings():
    """{"intra_op": n, "inter_op": n}: TensorFlow's thread pools (0 = TensorFlow's default, one per core)."""
    import tensorflow as tf

    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def cpu_line():
    """One line naming the machine, e.g. 'CPU: AMD EPYC (AVX2, AVX-512), 2 cores; oneDNN on (set by vgg-keras);
    TensorFlow threads intra-op 0, inter-op 0 (0 = one per core)'. Imports TensorFlow."""
    info = cpu_info()
    threads = thread_settings()
    how = {"user": f"{ONEDNN_VARIABLE}={os.environ.get(ONEDNN_VARIABLE)} set by the user",
           "vgg-keras": "set by vgg-keras", "too-late": "TensorFlow imported before vgg_keras",
           "not-x86": "not an x86 CPU", None: "vgg_keras not imported"}[onednn_choice]
    extensions = ", ".join(info["extensions"]) or "no AVX2"
    return (f"CPU: {info['model']} ({extensions}), {info['cores']} cores; "
            f"oneDNN {'on' if onednn_enabled() else 'off'} ({how}); "
            f"TensorFlow threads intra-op {threads['intra_op']}, inter-op {threads['inter_op']} (0 = one per core)")
