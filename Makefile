# Every target installs first: on a fresh clone `make train` and `make test` are all a user needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/vgg-keras

CONFIG ?= A
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test bench summary

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# --no-deps: its dependency on `tensorflow` would install a second TensorFlow over tensorflow-cpu
	$(PY) -m pip install -q --no-deps "tensorflow-serving-api==2.21.*"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/run.py

summary: install
	$(CLI) summary --config $(CONFIG)
