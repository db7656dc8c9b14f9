# Every target installs first: on a fresh clone `make train` and `make test` are all a user needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/vgg-keras

CONFIG ?= A
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test bench summary export

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# --no-deps: its dependency on `tensorflow` would install a second TensorFlow over tensorflow-cpu
	$(PY) -m pip install -q --no-deps "tensorflow-serving-api==2.21.*"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Two tests at a time (pytest-xdist: 2 cores), handed out one by one, the slow ones first (tests/conftest.py).
test: install
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 tests

bench: install
	$(PY) bench/run.py

summary: install
	$(CLI) summary --config $(CONFIG)

# `make train`: without DATA, the embedded demo data (generated on first use) at a reduced scale that trains
# config A in under 10 minutes on 2 CPU cores; with DATA=..., the paper's recipe (crop 224, batch 256, lr 0.01).
# SCALE=256:512 sets S, RUN=runs/x the run directory (default runs/<CONFIG> or runs/demo-<CONFIG>),
# TRAIN_FLAGS="--init-from runs/a ..." passes any other `vgg-keras train` flag.
.PHONY: train demo-data
DEMO_DATA := data/demo
DEMO_FLAGS := --scale 32:40 --crop 32 --batch-size 32 --lr 0.01 --epochs 6 --init glorot --plateau-patience 6
TRAIN_DATA = $(if $(DATA),$(DATA),$(DEMO_DATA))
TRAIN_RUN = $(if $(filter command line environment,$(origin RUN)),$(RUN),runs/$(if $(DATA),,demo-)$(CONFIG))
demo-data: install
	test -d $(DEMO_DATA) || $(CLI) make-demo-data $(DEMO_DATA)
train: install $(if $(DATA),,demo-data)
	$(CLI) train --config $(CONFIG) --data $(TRAIN_DATA) --run-dir $(TRAIN_RUN) $(if $(DATA),,$(DEMO_FLAGS)) \
		$(if $(SCALE),--scale $(SCALE)) $(TRAIN_FLAGS)

# Exports the newest runs/*/best.keras as saved_models/NAME/<next version> (NAME default: vgg_<config>).
# Override: make export RUN=runs/x NAME=y SCALES=256,384,512
RUN ?= $(patsubst %/best.keras,%,$(firstword $(filter-out runs/loc-%,$(shell ls -t runs/*/best.keras 2>/dev/null))))
export: install
	@test -n "$(RUN)" || { echo "make export: no runs/*/best.keras to export; train first or pass RUN=<run dir>" >&2; exit 2; }
	$(CLI) export --model $(RUN) $(if $(NAME),--name $(NAME)) $(if $(SCALES),--scales $(SCALES))

# Evaluation (PAPER.md section 3) of the newest run (RUN=runs/x to choose) on the validation data it was trained on
# (DATA=... SPLIT=... to choose), at the paper's test scales for its training scale (SCALES=256,384,512 to choose).
# eval-multicrop is the paper's "multi-crop & dense": its table has the dense, multi-crop and combined rows (Table 5).
# eval-fusion averages the posteriors of MODELS="runs/a runs/b" (Table 6) with METHOD (default multicrop+dense).
# Reports: RUN/eval-<target>.json and .md (fusion: runs/eval-fusion.json); PREDICTIONS=FILE for per-image top-5.
.PHONY: eval-center eval-dense eval-multicrop eval-fusion
MODELS ?= $(RUN)
METHOD ?= multicrop+dense
EVAL_FLAGS = $(if $(DATA),--data $(DATA)) $(if $(SPLIT),--split $(SPLIT)) $(if $(SCALES),--scales $(SCALES)) \
	$(if $(PREDICTIONS),--predictions $(PREDICTIONS))
eval-center eval-dense eval-multicrop: eval-%: install
	@test -n "$(RUN)" || { echo "make $@: no runs/*/best.keras to evaluate; train first or pass RUN=<run dir>" >&2; exit 2; }
	$(CLI) eval --model $(RUN) --method $(if $(filter multicrop,$*),multicrop+dense,$*) $(EVAL_FLAGS) \
		--out $(RUN)/eval-$*.json
eval-fusion: install
	@test -n "$(word 2,$(MODELS))" || { echo 'make eval-fusion: name two runs or more, e.g. MODELS="runs/a runs/b"' >&2; exit 2; }
	$(CLI) eval $(foreach m,$(MODELS),--model $(m)) --method $(METHOD) $(EVAL_FLAGS) --out runs/eval-fusion.json

# Localisation (PAPER.md section 5): `make train-loc` fine-tunes the newest demo classification run
# (LOC_FROM=runs/x to choose; default the newest runs/demo-*/best.keras) into a per-class box-regression net in
# LOC_RUN (default runs/loc-<from>), on the demo boxes (BOXES=... for VOC/ILSVRC XML folders or a Kaggle CSV).
# LOC_FLAGS passes other `vgg-keras train-localisation` flags (--regression single-class, --fine-tune fc, ...).
# `make eval-loc`: both protocols (centre crop; dense with the classifier's top-5), reports in LOC_RUN/eval-loc-*.
.PHONY: train-loc eval-loc
LOC_FROM ?= $(patsubst %/best.keras,%,$(firstword $(shell ls -t runs/demo-*/best.keras 2>/dev/null)))
LOC_RUN ?= runs/loc-$(notdir $(LOC_FROM))
BOXES ?= $(DEMO_DATA)/annotations.json
LOC_DEMO_FLAGS := --epochs 5 --lr 0.01 --plateau-patience 3
train-loc: install demo-data
	@test -n "$(LOC_FROM)" || { echo "make train-loc: no runs/demo-*/best.keras to start from; run make train first or pass LOC_FROM=<run dir>" >&2; exit 2; }
	$(CLI) train-localisation --from $(LOC_FROM) --boxes $(BOXES) --run-dir $(LOC_RUN) \
		$(if $(filter $(DEMO_DATA)/annotations.json,$(BOXES)),$(LOC_DEMO_FLAGS)) $(LOC_FLAGS)
eval-loc: install
	@test -f "$(LOC_RUN)/best.keras" || { echo "make eval-loc: $(LOC_RUN)/best.keras does not exist; run make train-loc first or pass LOC_RUN=<run dir>" >&2; exit 2; }
	$(CLI) eval-localisation --model $(LOC_RUN) --classifier $(LOC_FROM) --protocol center \
		--out $(LOC_RUN)/eval-loc-center.json --figure $(LOC_RUN)/eval-loc-center.png
	$(CLI) eval-localisation --model $(LOC_RUN) --classifier $(LOC_FROM) --protocol dense \
		--out $(LOC_RUN)/eval-loc-dense.json --figure $(LOC_RUN)/eval-loc-dense.png

# The paper's Tables 3-6 as one resumable plan (src/vgg_keras/reproduce.py). Without DATA: pipelines/demo.toml on the
# demo data (A, A-LRN, B, D and D fine-tuned at S/7, 2 epochs each) into runs/demo-paper; with DATA=...: the whole
# pipelines/paper.toml (a GPU's work) into runs/paper. TABLES=3,4 SHRINK=7 choose; PLAN=, RUNS=, REPRODUCE_FLAGS=
# ("--only D-384 --epochs 10 --dry-run") pass the rest. Interrupt it and run it again: it continues.
.PHONY: reproduce
PLAN ?= $(if $(DATA),pipelines/paper.toml,pipelines/demo.toml)
RUNS ?= $(if $(DATA),runs/paper,runs/demo-paper)
reproduce: install $(if $(DATA),,demo-data)
	$(CLI) reproduce --plan $(PLAN) --data $(TRAIN_DATA) --runs-dir $(RUNS) $(if $(TABLES),--tables $(TABLES)) \
		$(if $(SHRINK),--shrink $(SHRINK)) $(REPRODUCE_FLAGS)

# Transfer (PAPER.md section 6): features of MODELS (default: the newest run) on DATA=... (required), then the
# linear SVM; features and report in runs/transfer/ (FEATURE_FLAGS="--combine stack --scales 256,384,512",
# TRANSFER_FLAGS="--splits 3 --train-per-class 30" for the Caltech protocol).
.PHONY: transfer
transfer: install
	@test -n "$(DATA)" || { echo "make transfer: pass DATA=<data set to transfer to>" >&2; exit 2; }
	@test -n "$(MODELS)" || { echo "make transfer: no runs/*/best.keras; train first or pass MODELS=<runs>" >&2; exit 2; }
	mkdir -p runs/transfer
	$(CLI) transfer $(foreach m,$(MODELS),--model $(m)) --data $(DATA) --features-train runs/transfer/features-train.npz \
		--features-val runs/transfer/features-val.npz --out runs/transfer/transfer.json $(FEATURE_FLAGS) $(TRANSFER_FLAGS)
