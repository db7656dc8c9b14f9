"""The oneDNN choice and the CPU line (machine.py): each case in a fresh interpreter, since TensorFlow reads
TF_ENABLE_ONEDNN_OPTS once, when it is first imported."""

import os
import subprocess
import sys

import pytest

from vgg_keras import machine

PROBE = ("import warnings; warnings.simplefilter('always'); {first}; from vgg_keras import machine; "
         "print(machine.onednn_choice, machine.onednn_enabled(), __import__('os').environ.get('TF_ENABLE_ONEDNN_OPTS'))")


def probe(first="import vgg_keras", **env):
    environ = {k: v for k, v in os.environ.items() if k != machine.ONEDNN_VARIABLE}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), done.stderr


x86_only = pytest.mark.skipif(machine.platform.machine().lower() not in machine.X86, reason="x86 CPUs only")


@x86_only
def test_importing_vgg_keras_turns_onednn_on():
    (choice, enabled, value), _ = probe()
    assert (choice, enabled, value) == ("vgg-keras", "True", "1")


def test_the_users_choice_is_kept():
    (choice, enabled, value), _ = probe(TF_ENABLE_ONEDNN_OPTS="0")
    assert (choice, enabled, value) == ("user", "False", "0")


@x86_only
def test_tensorflow_imported_first_is_reported_when_it_left_onednn_off():
    # TF_ENABLE_ONEDNN_OPTS=0 stands for a CPU on which TensorFlow's default leaves oneDNN off; the variable is
    # removed after TensorFlow read it, as if the user had never set it.
    (choice, enabled, _), stderr = probe(
        first="import os, tensorflow; tensorflow.constant(1.0) + 1.0; del os.environ['TF_ENABLE_ONEDNN_OPTS']; "
              "import vgg_keras", TF_ENABLE_ONEDNN_OPTS="0")
    assert (choice, enabled) == ("too-late", "False")
    assert "Import vgg_keras first, or set TF_ENABLE_ONEDNN_OPTS=1" in stderr


def test_cpu_info_reads_the_model_and_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma amx_tile\n")
    info = machine.cpu_info(cpuinfo)
    assert info["model"] == "Test CPU 9000"
    assert info["extensions"] == ["AVX2", "AMX"]
    assert info["cores"] >= 1


def test_cpu_line_names_cpu_onednn_and_threads():
    line = machine.cpu_line()
    assert line.startswith("CPU: ")
    assert f"oneDNN {'on' if machine.onednn_enabled() else 'off'}" in line
    assert "intra-op" in line and "inter-op" in line
