"""`vgg-keras reproduce`: the paper's experiments (PAPER.md sections 2-4) as one resumable command.

A plan file (pipelines/paper.toml) names the training runs and the rows of Tables 3-6 with the published errors:

    base = "paper.toml"            optional: runs and tables of another plan (path relative to this file)
    [settings]                     optional: shrink, epochs (a cap), tables, only; the command line overrides them
    [train]                        optional: defaults for every run (TrainConfig fields that `vgg-keras train` has
                                   a flag for: batch_size, init, plateau_patience, crop, lr, ...)
    [runs.NAME]                    config, scale ("256" or "256:512"), init_from / finetune_from = "NAME",
                                   and any [train] key for this run alone
    [[tableN]]                     runs = [NAME, ...], method, scales = [Q, ...], error = [top-1, top-5] (%)

`resolve` turns a plan into a `Schedule`: the runs the chosen tables need, with their `init_from` / `finetune_from`
dependencies, in a topological order (graphlib; the plan file's order among the runs that are ready), each as a
`TrainConfig`; and the evaluations that give every row its errors. A multi-crop & dense evaluation also gives the
dense and multi-crop rows, and a fusion's evaluation also gives each member's rows (each member is evaluated on its
own at the same scales), so Table 5 and Table 4's jittered rows come out of Table 6's evaluation.

`reproduce` runs a schedule: a finished run is skipped, an unfinished one resumes (train.train does that), a failed one
stops the plan with its name and log; an evaluation already done with the same settings (the runs, their best.keras
files, method, scales, data) is read from RUNS/evaluations/. Interrupt it anywhere and run it again: it continues.
It writes RUNS/tables.md and tables.json (paper vs ours per row, the settings used, the seven trends of PAPER.md
section 4 as checks on our numbers, the expected cost of the full-size runs on a GPU) and RUNS/tableN.png.
"""

import contextlib
import dataclasses
import datetime
import functools
import graphlib
import hashlib
import json
import math
import os
import re
import sys
import time
import tomllib
import traceback

MIN_CROP = 32  # the smallest crop VGG's five 2x2 poolings take down to 1x1
TABLE_TITLES = {3: "single test scale", 4: "multiple test scales", 5: "evaluation method", 6: "fusion of D and E"}
METHOD_NAMES = {"center": "centre crop", "dense": "dense", "multicrop": "multi-crop",
                "multicrop+dense": "multi-crop & dense"}
SETTINGS_KEYS = ("shrink", "epochs", "tables", "only")
# TrainConfig fields that `vgg-keras train` has a flag for (so --dry-run can print every run as a command)
TRAIN_FLAGS = {"data_dir": "--data-dir", "manual_dir": "--manual-dir", "crop": "--crop", "epochs": "--epochs",
               "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay", "dropout": "--dropout",
               "init": "--init", "init_std": "--init-std", "plateau_patience": "--plateau-patience",
               "stats": "--stats", "val_fraction": "--val-fraction", "mixed_precision": "--mixed-precision",
               "xla": "--xla", "seed": "--seed"}
RUN_KEYS = {"config", "scale", "init_from", "finetune_from", "note", *TRAIN_FLAGS}

# The expected cost of the full-size plan on a GPU (not measured): multiply-adds / an assumed sustained rate.
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set
GPU_MACS_PER_S = 50e12  # assumed: 100 TFLOP/s sustained, mixed precision on one A100/H100-class GPU
TRAIN_MACS_PER_FORWARD = 3  # forward + backward (gradients of activations and of weights) ~ 3 forward passes


class PlanError(ValueError):
    """A plan that cannot run: bad plan file, unknown table or run, a cycle, a run that failed."""


# ---------------------------------------------------------------------------------------------------------
# The plan file


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a paper table: runs (one, or several fused), method, test scales Q (px) and the published
    (top-1, top-5) error in %."""

    table: int
    runs: tuple
    method: str
    scales: tuple
    paper: tuple

    @property
    def key(self):
        return (self.table, self.runs, self.method)


@dataclasses.dataclass
class Plan:
    path: str
    runs: dict  # name -> {config, scale, init_from?, finetune_from?, TrainConfig keys...}, in file order
    tables: dict  # table number -> [Row]
    settings: dict
    train: dict


def _read_toml(path, seen=()):
    """The plan's TOML with its `base` chain merged in (the plan's own runs, settings and train keys win)."""
    path = os.path.abspath(path)
    if path in seen:
        raise PlanError(f"{path}: `base` plans include each other ({' -> '.join(seen + (path,))})")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise PlanError(f"--plan {path}: no such plan file") from None
    except tomllib.TOMLDecodeError as err:
        raise PlanError(f"--plan {path}: not valid TOML ({err})") from None
    if "base" not in doc:
        return doc
    base = _read_toml(os.path.join(os.path.dirname(path), doc.pop("base")), seen + (path,))
    merged = {**base, **{k: v for k, v in doc.items() if k not in ("runs", "settings", "train")}}
    for key in ("runs", "settings", "train"):
        merged[key] = {**base.get(key, {}), **doc.get(key, {})}
    return merged


def load_plan(path):
    """Read and check a plan file (see the module docstring). Raises PlanError naming the file and the key."""
    from . import evaluate
    from .configs import check_config
    from .data import parse_scale

    doc = _read_toml(path)
    runs = doc.get("runs", {})
    if not runs:
        raise PlanError(f"{path}: the plan has no [runs.NAME]")
    for name, run in runs.items():
        unknown = set(run) - RUN_KEYS
        if unknown:
            raise PlanError(f"{path}: run {name}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(RUN_KEYS))}")
        if "config" not in run or "scale" not in run:
            raise PlanError(f"{path}: run {name} needs config and scale")
        try:
            check_config(run["config"])
            parse_scale(run["scale"], flag=f"run {name}: scale")
        except ValueError as err:
            raise PlanError(f"{path}: {err}") from None
        if "init_from" in run and "finetune_from" in run:
            raise PlanError(f"{path}: run {name} has both init_from and finetune_from")
    tables = {}
    for key, rows in doc.items():
        match = re.fullmatch(r"table(\d+)", key)
        if not match:
            continue
        number = int(match.group(1))
        tables[number] = []
        for i, row in enumerate(rows):
            where = f"{path}: [[{key}]] row {i + 1}"
            try:
                evaluate.check_method(row["method"])
                top1, top5 = row["error"]
                made = Row(number, tuple(row["runs"]), row["method"], tuple(int(q) for q in row["scales"]),
                           (float(top1), float(top5)))
            except (KeyError, TypeError, ValueError) as err:
                raise PlanError(f"{where}: needs runs, method, scales and error = [top-1, top-5] ({err})") from None
            for name in made.runs:
                if name not in runs:
                    raise PlanError(f"{where}: unknown run {name!r}")
            if any(made.key == other.key for other in tables[number]):
                raise PlanError(f"{where}: a second row for {made.runs} {made.method}")
            tables[number].append(made)
    settings, train = doc.get("settings", {}), doc.get("train", {})
    for name, given, known in (("[settings]", settings, SETTINGS_KEYS), ("[train]", train, TRAIN_FLAGS)):
        unknown = set(given) - set(known)
        if unknown:
            raise PlanError(f"{path}: {name}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(known))}")
    return Plan(str(path), runs, tables, settings, train)


# ---------------------------------------------------------------------------------------------------------
# From a plan to a schedule


def shrink_size(pixels, k):
    """`pixels` / k, rounded half up (a shrunk scale or test scale)."""
    return int(math.floor(pixels / k + 0.5))


def parse_list(text, flag, kind=str):
    """'3,4' -> [3, 4] for --tables / --only; a bad item is an error naming the flag."""
    try:
        return [kind(item.strip()) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise PlanError(f"{flag} {text!r}: expected a comma-separated list") from None


@dataclasses.dataclass
class Evaluation:
    """One `vgg-keras eval`: runs (names; several are fused), method, test scales (ours, px) and the rows it
    gives."""

    runs: tuple
    method: str
    scales: tuple
    rows: list = dataclasses.field(default_factory=list)

    def provides(self, row, scales):
        from .evaluate import component_methods

        return (scales == self.scales and row.method in component_methods(self.method)
                and (row.runs == self.runs or (len(row.runs) == 1 and row.runs[0] in self.runs)))

    def report_index(self, row):
        """The index of `row` in this evaluation's report rows: evaluate() orders them member by member, each
        member's component methods in order, then the fusion's."""
        from .evaluate import component_methods

        methods = component_methods(self.method)
        member = len(self.runs) if row.runs == self.runs and len(self.runs) > 1 else self.runs.index(row.runs[0])
        return member * len(methods) + methods.index(row.method)


@dataclasses.dataclass
class Schedule:
    plan: Plan
    data: str
    runs_dir: str
    shrink: int
    epochs: int | None
    tables: list
    only: list | None
    order: list  # run names, each after its dependencies
    trainings: dict  # name -> TrainConfig
    rows: list  # the rows of the chosen tables whose runs are all in `order`
    evaluations: list

    def run_dir(self, name):
        return os.path.join(self.runs_dir, name)

    def training(self, name):
        """The TrainConfig of run `name`, also for a run this schedule does not train (to report our S)."""
        return self.trainings.get(name) or train_config(self.plan, name, self.data, self.runs_dir, self.shrink,
                                                        self.epochs)

    def our_scales(self, row):
        return tuple(shrink_size(q, self.shrink) for q in row.scales)


def _closure(plan, names):
    """`names` and every run they depend on; an unknown name is an error naming who asked for it."""
    needed, stack = set(), [(name, None) for name in names]
    while stack:
        name, wanted_by = stack.pop()
        if name not in plan.runs:
            who = f"run {wanted_by} depends on" if wanted_by else "--only names"
            raise PlanError(f"{plan.path}: {who} {name!r}, which the plan does not define "
                            f"(runs: {', '.join(plan.runs)})")
        if name in needed:
            continue
        needed.add(name)
        stack += [(plan.runs[name][key], name) for key in ("init_from", "finetune_from") if key in plan.runs[name]]
    return needed


def run_order(plan, names):
    """Topological order of the runs `names` need (dependencies first; among ready runs, the plan file's order).
    Raises PlanError for an unknown run or a cycle, naming them."""
    needed = _closure(plan, names)
    position = {name: i for i, name in enumerate(plan.runs)}
    sorter = graphlib.TopologicalSorter()
    for name in needed:
        sorter.add(name, *[plan.runs[name][key] for key in ("init_from", "finetune_from") if key in plan.runs[name]])
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        raise PlanError(f"{plan.path}: runs {' -> '.join(err.args[1])} form a cycle of init_from / finetune_from") \
            from None
    order, ready = [], []
    while sorter.is_active():
        ready = sorted(set(ready) | set(sorter.get_ready()), key=position.get)
        name = ready.pop(0)
        order.append(name)
        sorter.done(name)
    return order


def train_config(plan, name, data, runs_dir, shrink, epochs_cap):
    """The TrainConfig of run `name`: the plan's [train] defaults, the run's own keys, S and the crop shrunk by
    `shrink` (crop >= MIN_CROP, S >= crop), epochs capped at `epochs_cap`."""
    from .data import parse_scale
    from .train import TrainConfig

    run = plan.runs[name]
    fields = {**plan.train, **{k: v for k, v in run.items() if k in TRAIN_FLAGS}}
    crop = fields.get("crop", TrainConfig.crop)
    if shrink > 1:
        crop = max(MIN_CROP, shrink_size(crop, shrink))
    scale = tuple(max(crop, shrink_size(s, shrink)) for s in parse_scale(run["scale"]))
    fields.update(crop=crop, scale=scale)
    if epochs_cap:
        fields["epochs"] = min(fields.get("epochs", TrainConfig.epochs), epochs_cap)
    for key in ("init_from", "finetune_from"):
        if key in run:
            fields[key] = os.path.join(runs_dir, run[key])
    return TrainConfig(config=run["config"], data=data, run_dir=os.path.join(runs_dir, name), **fields)


def plan_evaluations(rows, our_scales):
    """The fewest evaluations that give every row: fusion rows first (they also give their members' rows), and
    one multi-crop & dense evaluation where a run is wanted both dense and multi-crop at the same scales."""
    from .evaluate import component_methods

    wanted = {}
    for row in rows:
        wanted.setdefault((row.runs, our_scales(row)), set()).add(row.method)
    evaluations = []
    for row in sorted(rows, key=lambda r: -len(r.runs)):
        scales = our_scales(row)
        provider = next((e for e in evaluations if e.provides(row, scales)), None)
        if provider is None:
            methods = wanted[(row.runs, scales)]
            method = "multicrop+dense" if len(methods & set(component_methods("multicrop+dense"))) > 1 \
                else row.method
            provider = Evaluation(row.runs, method, scales)
            evaluations.append(provider)
        provider.rows.append(row)
    position = {row.key: i for i, row in enumerate(rows)}
    for evaluation in evaluations:
        evaluation.rows.sort(key=lambda r: position[r.key])
    return sorted(evaluations, key=lambda e: position[e.rows[0].key])  # in the tables' order


def resolve(plan, data, runs_dir, tables=None, only=None, shrink=None, epochs=None):
    """The Schedule for `plan`: tables (numbers; default the plan's [settings] tables, else all), only (run names:
    train these and their dependencies, evaluate the rows they make possible), shrink (divide S, Q and the crop),
    epochs (cap). The command line's values override the plan's [settings]."""
    settings = plan.settings
    tables = list(tables or settings.get("tables") or sorted(plan.tables))
    for number in tables:
        if number not in plan.tables:
            raise PlanError(f"--tables: {plan.path} has no table {number} "
                            f"(it has {', '.join(str(t) for t in sorted(plan.tables)) or 'none'})")
    only = list(only or settings.get("only") or []) or None
    shrink = int(shrink or settings.get("shrink") or 1)
    epochs = epochs or settings.get("epochs")
    if shrink < 1:
        raise PlanError(f"--shrink {shrink}: must be a positive integer")
    if epochs is not None and int(epochs) < 1:
        raise PlanError(f"--epochs {epochs}: must be at least 1")
    rows = [row for number in tables for row in plan.tables[number]]
    order = run_order(plan, only if only else [name for row in rows for name in row.runs])
    rows = [row for row in rows if set(row.runs) <= set(order)]
    trainings = {name: train_config(plan, name, data, runs_dir, shrink, epochs) for name in order}
    schedule = Schedule(plan, data, runs_dir, shrink, epochs, tables, only, order, trainings, rows, [])
    schedule.evaluations = plan_evaluations(rows, schedule.our_scales)
    return schedule


# ---------------------------------------------------------------------------------------------------------
# Commands, state and the evaluation cache


def train_command(cfg):
    """`cfg` as the `vgg-keras train` command it stands for (flags only where they differ from the defaults,
    besides config, data, run-dir, scale, crop and epochs)."""
    from .train import TrainConfig

    smin, smax = cfg.scale
    parts = ["vgg-keras train", f"--config {cfg.config}", f"--data {cfg.data}", f"--run-dir {cfg.run_dir}",
             f"--scale {smin}" if smin == smax else f"--scale {smin}:{smax}", f"--crop {cfg.crop}",
             f"--epochs {cfg.epochs}"]
    if cfg.init_from:
        parts.append(f"--init-from {cfg.init_from}")
    if cfg.finetune_from:
        parts.append(f"--finetune-from {cfg.finetune_from}")
    for field, flag in TRAIN_FLAGS.items():
        value, default = getattr(cfg, field), getattr(TrainConfig, field)
        if field in ("crop", "epochs") or value == default:
            continue
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def eval_command(schedule, evaluation):
    models = " ".join(f"--model {schedule.run_dir(name)}" for name in evaluation.runs)
    return (f"vgg-keras eval {models} --data {schedule.data} --method {evaluation.method} "
            f"--scales {','.join(str(q) for q in evaluation.scales)} --out {cached_report_path(schedule, evaluation)}")


def run_status(cfg):
    """'finished', 'unfinished' (a checkpoint to resume from) or 'new'."""
    from .train import RunDirectory

    state = RunDirectory(cfg.run_dir).load_state()
    return "new" if not state else "finished" if state.get("finished") else "unfinished"


def check_finished_run(cfg):
    """A finished run is reused only if it was trained with these settings (the epoch cap aside)."""
    with open(os.path.join(cfg.run_dir, "config.json")) as f:
        previous = json.load(f)
    ours = {**dataclasses.asdict(cfg), "scale": list(cfg.scale)}
    # keys a run predating a new TrainConfig field lacks are not a difference
    changed = {k: (previous[k], v) for k, v in ours.items() if k != "epochs" and k in previous and previous[k] != v}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise PlanError(f"{cfg.run_dir} holds a finished run with other settings ({diff}); "
                        "use another --runs-dir, or delete that run to train it again")


def evaluation_settings(schedule, evaluation):
    """What an evaluation's result depends on: the cache key. The models are fingerprinted by their best.keras
    (size, mtime), so a run trained again is evaluated again."""
    models = []
    for name in evaluation.runs:
        best = os.path.join(schedule.run_dir(name), "best.keras")
        stat = os.stat(best) if os.path.exists(best) else None
        models.append({"run": schedule.run_dir(name), "best_keras": [stat.st_size, stat.st_mtime_ns] if stat else None})
    return {"models": models, "method": evaluation.method, "scales": list(evaluation.scales),
            "data": schedule.data, "split": "val", "flip": True}


def cached_report_path(schedule, evaluation):
    settings = evaluation_settings(schedule, evaluation)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{'+'.join(evaluation.runs)}_{evaluation.method}_{'-'.join(str(q) for q in evaluation.scales)}_{digest}"
    return os.path.join(schedule.runs_dir, "evaluations", name + ".json")


def cached_report(schedule, evaluation):
    """The report of an evaluation already done with the same settings, or None."""
    path = cached_report_path(schedule, evaluation)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return report if report.get("reproduce_settings") == evaluation_settings(schedule, evaluation) else None


def row_errors(evaluation, report, row):
    """(top-1, top-5) error in % of `row` from its evaluation's report."""
    entry = report["rows"][evaluation.report_index(row)]
    if entry["method"] != row.method or entry.get("fusion", False) != (len(row.runs) > 1):
        raise PlanError(f"evaluation report of {evaluation.runs} does not have the row {row.runs} {row.method} "
                        f"where expected (found {entry['config']} {entry['method']})")
    return entry["top1_error"], entry["top5_error"]


class _Tee:
    """A text stream that writes to `stream` and to `log`; the log gets each line's final state (a progress bar's
    carriage-return redraws are collapsed into its last one)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text):
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(line.split("\r")[-1].replace("\b", "") + "\n")
        self.pending = self.pending.split("\r")[-1]
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the terminal
        return getattr(self.stream, name)


@contextlib.contextmanager
def logged_to(path):
    """stdout and stderr also appended to `path` (what training prints, and the traceback of a failure)."""
    with open(path, "a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, log)):
        yield log


class Progress:
    """Plain progress lines across the whole plan: step i of n, how many left, the time so far."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, text):
        self.done += 1
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.start))
        print(f"[reproduce {self.done}/{self.total}, {self.total - self.done} left after this, {elapsed} so far] "
              f"{text}", flush=True)


class PlanState:
    """RUNS/reproduce.json: time spent per run and per evaluation, summed over resumed invocations, and the
    multiply-adds per configuration (computed once per runs directory)."""

    def __init__(self, runs_dir):
        self.path = os.path.join(runs_dir, "reproduce.json")
        self.data = {"train_seconds": {}, "eval_seconds": {}, "forward_multiply_adds": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data.update(json.load(f))

    def add(self, kind, key, seconds):
        self.data[kind][key] = round(self.data[kind].get(key, 0.0) + seconds, 1)
        self.save()

    def save(self):
        from .runs import write_json_atomic

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json_atomic(self.path, self.data)


# ---------------------------------------------------------------------------------------------------------
# Running a schedule


def dry_run(schedule, out=None):
    """Print each training and evaluation as the `vgg-keras` command it stands for, with its status."""
    out = out or sys.stdout
    print(f"# {schedule.plan.path}: tables {', '.join(str(t) for t in schedule.tables)}; "
          f"{len(schedule.order)} runs, {len(schedule.rows)} rows in {len(schedule.evaluations)} evaluations; "
          f"shrink {schedule.shrink}, epochs {schedule.epochs or 'as planned'}", file=out)
    for name in schedule.order:
        cfg = schedule.trainings[name]
        print(f"{train_command(cfg)}  # {name}: {run_status(cfg)}", file=out)
    for evaluation in schedule.evaluations:
        done = "done" if cached_report(schedule, evaluation) else "to do"
        rows = ", ".join(f"table {r.table} {'+'.join(r.runs)} {r.method}" for r in evaluation.rows)
        print(f"{eval_command(schedule, evaluation)}  # {done}: {rows}", file=out)


def train_runs(schedule, progress, state):
    from .train import train

    for name in schedule.order:
        cfg = schedule.trainings[name]
        status = run_status(cfg)
        if status == "finished":
            check_finished_run(cfg)
            progress.step(f"train {name}: finished, skipped")
            continue
        progress.step(f"train {name} ({'resuming' if status == 'unfinished' else 'new'}): {train_command(cfg)}")
        os.makedirs(cfg.run_dir, exist_ok=True)
        log_path = os.path.join(cfg.run_dir, "train.log")
        start = time.monotonic()
        try:
            with logged_to(log_path) as log:
                try:
                    train(cfg)
                except Exception:
                    log.write(traceback.format_exc())
                    raise
        except Exception as err:
            raise PlanError(f"run {name} failed: {type(err).__name__}: {err} (log: {log_path}); the plan stopped "
                            "there; fix the cause and run the same command again to continue") from err
        finally:
            state.add("train_seconds", name, time.monotonic() - start)


def evaluate_rows(schedule, progress, state, on_result):
    from .evaluate import run_evaluation
    from .report import write_report

    for evaluation in schedule.evaluations:
        what = f"evaluate {' + '.join(evaluation.runs)} {evaluation.method} Q={list(evaluation.scales)}"
        report = cached_report(schedule, evaluation)
        if report is not None:
            progress.step(f"{what}: done before, reused")
        else:
            progress.step(f"{what}: {eval_command(schedule, evaluation)}")
            settings = evaluation_settings(schedule, evaluation)
            start = time.monotonic()
            report = run_evaluation([schedule.run_dir(name) for name in evaluation.runs], data=schedule.data,
                                    method=evaluation.method, scales=evaluation.scales)
            path = cached_report_path(schedule, evaluation)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_report({**report, "reproduce_settings": settings}, path)
            state.add("eval_seconds", os.path.basename(path), time.monotonic() - start)
        for row in evaluation.rows:
            on_result(row, row_errors(evaluation, report, row))


def reproduce(plan_path, data, runs_dir, tables=None, only=None, shrink=None, epochs=None, dry=False):
    """`vgg-keras reproduce`: train the runs the chosen tables need (in dependency order; finished ones skipped,
    unfinished ones resumed), evaluate every row (cached evaluations reused), write RUNS/tables.md, tables.json and
    tableN.png. Returns the report dict (None for a dry run). Raises PlanError (bad plan, failed run)."""
    plan = load_plan(plan_path)
    schedule = resolve(plan, data, runs_dir, tables, only, shrink, epochs)
    if dry:
        dry_run(schedule)
        return None
    state = PlanState(runs_dir)
    progress = Progress(len(schedule.order) + len(schedule.evaluations))
    try:
        train_runs(schedule, progress, state)
        results = {}
        evaluate_rows(schedule, progress, state, lambda row, errors: results.__setitem__(row.key, errors))
    except KeyboardInterrupt:
        print("\nreproduce: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        raise
    report = build_report(schedule, results, state, gpu_costs(schedule, state))
    paths = write_tables(report, runs_dir)
    print(report_markdown(report))
    print("written: " + ", ".join(paths))
    return report


# ---------------------------------------------------------------------------------------------------------
# The report: paper vs ours, the trends, the GPU cost


def format_scale(smin, smax):
    return str(smin) if smin == smax else f"[{smin};{smax}]"


def _row_label(plan, row):
    return " + ".join(plan.runs[name]["config"] for name in row.runs)


def _paper_train_scale(plan, row):
    from .data import parse_scale

    return _joined(format_scale(*parse_scale(plan.runs[name]["scale"])) for name in row.runs)


def _joined(scales):
    """A fusion's training scales: one when its members share it, else 'S1 / S2'."""
    return " / ".join(dict.fromkeys(scales))


def table_entry(schedule, row, errors):
    """One report row: the paper's and our settings and errors (ours None when not evaluated)."""
    plan = schedule.plan
    ours_s = _joined(format_scale(*schedule.training(name).scale) for name in row.runs)
    top1, top5 = errors if errors else (None, None)
    return {"runs": list(row.runs), "config": _row_label(plan, row), "method": row.method,
            "train_scale": _paper_train_scale(plan, row), "test_scales": list(row.scales),
            "our_train_scale": ours_s, "our_test_scales": list(schedule.our_scales(row)),
            "paper_top1": row.paper[0], "paper_top5": row.paper[1], "top1": top1, "top5": top5}


@dataclasses.dataclass
class Comparison:
    """ours / paper: top-1 of row `a` minus the best (lowest) top-1 of rows `b`; `expect` "lower" (holds when
    < 0), "not lower" (holds when >= 0) or None (shown, not judged)."""

    label: str
    a: tuple
    b: list
    expect: str | None = "lower"


def _find(plan, table, config, scale, method="dense"):
    """The key of the row of `table` for one run of `config` trained at `scale` (as in the plan, e.g. "256:512"),
    or None."""
    for row in plan.tables.get(table, []):
        run = plan.runs[row.runs[0]]
        if len(row.runs) == 1 and row.method == method and (run["config"], run["scale"]) == (config, scale):
            return row.key
    return None


def trend_comparisons(plan):
    """The seven trends of PAPER.md section 4, each a list of Comparisons between rows of the plan's tables."""
    from .data import parse_scale

    t3 = functools.partial(_find, plan, 3)
    trends = [
        ("LRN does not help", [Comparison("A-LRN top-1 − A top-1", t3("A-LRN", "256"), [t3("A", "256")],
                                          "not lower")]),
        ("Error falls with depth (A → B → D ≈ E)", [
            Comparison("B top-1 − A top-1", t3("B", "256"), [t3("A", "256")]),
            Comparison("D top-1 − B top-1", t3("D", "256"), [t3("B", "256")]),
            Comparison("E top-1 − D top-1", t3("E", "256"), [t3("D", "256")], None)]),
        ("1×1 convs help less than 3×3 (C worse than D)", [
            Comparison(f"D top-1 − C top-1 at S = {format_scale(*parse_scale(s))}",
                       t3("D", s), [t3("C", s)]) for s in ("256", "384", "256:512")]),
        ("Scale jittering at training time helps, even at a single test scale", [
            Comparison(f"{c} [256;512] top-1 − {c} S = {s} top-1", t3(c, "256:512"), [t3(c, s)])
            for c in ("C", "D", "E") for s in ("256", "384")]),
    ]
    multi_scale = []
    for row in plan.tables.get(4, []):
        single = [r for r in plan.tables.get(3, []) if r.runs == row.runs and r.method == row.method]
        if len(row.runs) == 1 and single:
            multi_scale.append(Comparison(
                f"{_row_label(plan, row)} S = {_paper_train_scale(plan, row)}: Q = {{{','.join(map(str, row.scales))}}}"
                f" − Q = {single[0].scales[0]}", row.key, [single[0].key]))
    trends.append(("Multi-scale testing helps", multi_scale))
    complementary = []
    for row in plan.tables.get(5, []):
        if row.method == "multicrop+dense":
            parts = [key for key in ((5, row.runs, "dense"), (5, row.runs, "multicrop"))
                     if any(r.key == key for r in plan.tables[5])]
            complementary.append(Comparison(f"{_row_label(plan, row)}: multi-crop & dense − best of dense, "
                                            "multi-crop", row.key, parts))
    trends.append(("Multi-crop and dense evaluation are complementary", complementary))
    fusion = []
    for row in plan.tables.get(6, []):
        # each member's own row at the fusion's method and scales, from whichever table has it
        singles = [r for table in (5, 4, 3) for r in plan.tables.get(table, [])
                   if len(r.runs) == 1 and r.runs[0] in row.runs and (r.method, r.scales) == (row.method, row.scales)]
        members = list({r.runs: r.key for r in reversed(singles)}.values())
        fusion.append(Comparison(f"{_row_label(plan, row)} {METHOD_NAMES[row.method]}: fusion − best single net",
                                 row.key, members))
    trends.append(("Fusing models helps", fusion))
    return trends


def _difference(a, b, top1):
    """top1[a] - min(top1[k] for k in b), or None when one of them is missing."""
    return round(top1[a] - min(top1[k] for k in b), 2) if a in top1 and all(k in top1 for k in b) else None


def trend_checks(plan, results):
    """[{number, name, comparisons: [{label, ours, paper, expect, holds}], verdict, statement}]: each trend of
    PAPER.md section 4 checked on our top-1 errors `results` ({row key: (top-1, top-5)}) beside the paper's."""
    paper = {row.key: row.paper[0] for rows in plan.tables.values() for row in rows}
    ours = {key: errors[0] for key, errors in results.items() if errors is not None}
    checks = []
    for number, (name, comparisons) in enumerate(trend_comparisons(plan), start=1):
        entries = []
        for c in comparisons:
            if c.a is None or not c.b or None in c.b:
                continue  # the plan has no such rows
            diff, paper_diff = _difference(c.a, c.b, ours), _difference(c.a, c.b, paper)
            holds = None if diff is None or c.expect is None else diff < 0 if c.expect == "lower" else diff >= 0
            entries.append({"label": c.label, "ours": diff, "paper": paper_diff, "expect": c.expect, "holds": holds})
        judged = [e["holds"] for e in entries if e["holds"] is not None]
        verdict = ("not measured" if not judged else "holds" if all(judged) else
                   "does not hold" if not any(judged) else f"holds in {sum(judged)} of {len(judged)}")
        parts = [f"{e['label']} = " + (f"{e['ours']:+.1f}" if e["ours"] is not None else "not run") +
                 (f" (paper {e['paper']:+.1f})" if e["paper"] is not None else "") for e in entries]
        if entries and all(e["ours"] is None for e in entries):  # one line, not a list of "not run"
            published = ", ".join(f"{e['paper']:+.1f}" for e in entries if e["paper"] is not None)
            parts = [f"none of its {len(entries)} comparisons was run (paper: {published})"]
        statement = f"{number}. {name}: " + ("; ".join(parts) if parts else "no rows in this plan") + f" → {verdict}"
        checks.append({"number": number, "name": name, "comparisons": entries, "verdict": verdict,
                       "statement": statement})
    return checks


def forward_multiply_adds(config, crop, state=None, num_classes=1000):
    """Multiply-adds of one forward pass of `config` on a crop x crop image (model.multiply_adds), remembered in
    RUNS/reproduce.json."""
    key = f"{config}@{crop}x{num_classes}"
    cache = state.data["forward_multiply_adds"] if state else {}
    if key not in cache:
        import keras

        from .model import build_vgg, multiply_adds

        cache[key] = int(multiply_adds(build_vgg(config, num_classes=num_classes, input_shape=(crop, crop, 3))))
        keras.backend.clear_session()
        if state:
            state.save()
    return cache[key]


def gpu_costs(schedule, state=None, images=IMAGENET_TRAIN_IMAGES, rate=GPU_MACS_PER_S):
    """Expected cost of each run of the schedule at full size (crop 224, 1000 classes, `images` per epoch, the
    plan's epochs before any cap or shrink) on a GPU sustaining `rate` multiply-adds/s: TRAIN_MACS_PER_FORWARD x
    forward multiply-adds x images x epochs. An estimate from the arithmetic, not a measurement; the plateau
    schedule ends most runs before their epoch count, so it is an upper bound."""
    from .train import TrainConfig

    costs = []
    for name in schedule.order:
        run = schedule.plan.runs[name]
        epochs = run.get("epochs", schedule.plan.train.get("epochs", TrainConfig.epochs))
        crop = run.get("crop", schedule.plan.train.get("crop", TrainConfig.crop))
        forward = forward_multiply_adds(run["config"], crop, state)
        total = TRAIN_MACS_PER_FORWARD * forward * images * epochs
        costs.append({"run": name, "config": run["config"], "crop": crop, "forward_gmacs": round(forward / 1e9, 2),
                      "epochs": epochs, "images": images, "train_macs": total,
                      "gpu_hours": round(total / rate / 3600, 1)})
    return costs


def build_report(schedule, results, state=None, costs=None):
    """The report dict of tables.json: settings, per table the rows (paper and ours), trends, runs, GPU costs."""
    from .train import RunDirectory

    tables = {}
    for number in schedule.tables:
        rows = [table_entry(schedule, row, results.get(row.key)) for row in schedule.plan.tables[number]]
        tables[str(number)] = {"title": TABLE_TITLES.get(number, f"table {number}"), "rows": rows}
    runs = {}
    for name in schedule.order:
        cfg = schedule.trainings[name]
        run_state = RunDirectory(cfg.run_dir).load_state() or {}
        runs[name] = {"config": cfg.config, "scale": list(cfg.scale), "crop": cfg.crop, "epochs_cap": cfg.epochs,
                      "epochs": run_state.get("epoch"), "finished": bool(run_state.get("finished")),
                      "best_val_top1": run_state.get("best_top1"),
                      "train_seconds": state.data["train_seconds"].get(name) if state else None}
    try:
        from .machine import cpu_line

        machine = cpu_line()
    except Exception as err:  # the report must not fail over a description of the machine
        machine = f"unknown ({err})"
    return {
        "plan": schedule.plan.path, "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "settings": {"data": schedule.data, "runs_dir": schedule.runs_dir, "shrink": schedule.shrink,
                     "epochs_cap": schedule.epochs, "tables": schedule.tables, "only": schedule.only,
                     "crop": sorted({cfg.crop for cfg in schedule.trainings.values()})},
        "machine": machine,
        "seconds": {"train": round(sum(state.data["train_seconds"].values()), 1) if state else None,
                    "eval": round(sum(state.data["eval_seconds"].values()), 1) if state else None},
        "tables": tables, "trends": trend_checks(schedule.plan, results), "runs": runs, "gpu_cost": costs or [],
    }


def _pct(value):
    return "—" if value is None else f"{value:.1f}"


def report_markdown(report):
    """tables.md: settings, Tables 3-6 paper vs ours, the trends, the runs, the GPU cost of the full plan."""
    s = report["settings"]
    shrunk = s["shrink"] > 1
    lines = ["# The paper's Tables 3-6 and ours", "",
             f"Plan `{report['plan']}`, data `{s['data']}`, runs in `{s['runs_dir']}`; shrink {s['shrink']}"
             + (f" (S, Q and the crop divided by {s['shrink']}: crop {', '.join(map(str, s['crop']))}; our S and Q "
                "in parentheses)" if shrunk else "")
             + f"; epochs {'at most ' + str(s['epochs_cap']) if s['epochs_cap'] else 'as planned'}"
             + (f"; runs limited to {', '.join(s['only'])} and their dependencies" if s["only"] else "") + ".",
             f"Time: training {_seconds(report['seconds']['train'])}, evaluation "
             f"{_seconds(report['seconds']['eval'])} on {report['machine']}. Generated {report['generated']}.", ""]
    for number, table in report["tables"].items():
        lines += [f"## Table {number}: {table['title']}", "",
                  "| config | train S | test Q | method | top-1 paper | top-1 ours | top-5 paper | top-5 ours |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for row in table["rows"]:
            q = ",".join(map(str, row["test_scales"]))
            our_q = ",".join(map(str, row["our_test_scales"]))
            train_s = row["train_scale"] + (f" ({row['our_train_scale']})" if shrunk else "")
            test_q = (f"{{{q}}}" if len(row["test_scales"]) > 1 else q) + (f" ({our_q})" if shrunk else "")
            lines.append(f"| {row['config']} | {train_s} | {test_q} | {METHOD_NAMES[row['method']]} | "
                         f"{_pct(row['paper_top1'])} | {_pct(row['top1'])} | {_pct(row['paper_top5'])} | "
                         f"{_pct(row['top5'])} |")
        lines.append("")
    lines += ["## The trends of PAPER.md section 4, checked on our top-1 errors", ""]
    lines += [trend["statement"] for trend in report["trends"]]
    lines += ["", "Differences are in top-1 error points (negative: the first is better); “holds” is judged on the "
              "sign the paper's trend predicts, without a noise margin.", "",
              "## Runs", "", "| run | config | S | crop | epochs | best val top-1 | training time |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, run in report["runs"].items():
        best = f"{100 * run['best_val_top1']:.1f} %" if run["best_val_top1"] is not None else "—"
        lines.append(f"| {name} | {run['config']} | {format_scale(*run['scale'])} | {run['crop']} | "
                     f"{run['epochs'] if run['epochs'] is not None else '—'} / {run['epochs_cap']} | {best} | "
                     f"{_seconds(run['train_seconds'])} |")
    if report["gpu_cost"]:
        lines += ["", "## Expected cost of these runs at full size on a GPU (estimated, not measured)", "",
                  f"3 × forward multiply-adds (model.multiply_adds at 224², 1000 classes) × "
                  f"{IMAGENET_TRAIN_IMAGES:,} images × epochs, at an assumed {GPU_MACS_PER_S / 1e12:.0f} T "
                  "multiply-adds/s; an upper bound (the plateau schedule ends runs earlier).", "",
                  "| run | config | forward G mult-adds | epochs | GPU hours |", "|---|---|---:|---:|---:|"]
        lines += [f"| {c['run']} | {c['config']} | {c['forward_gmacs']:.2f} | {c['epochs']} | {c['gpu_hours']:.1f} |"
                  for c in report["gpu_cost"]]
        lines.append(f"| all | | | | {sum(c['gpu_hours'] for c in report['gpu_cost']):.1f} |")
    return "\n".join(lines) + "\n"


def _seconds(seconds):
    return "—" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def plot_table(table, number, path):
    """tableN.png: top-1 and top-5 error per row, the paper's beside ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .runs import atomic_path

    rows = table["rows"]
    labels = [f"{r['config']} {r['train_scale']}\n{METHOD_NAMES[r['method']]} Q={','.join(map(str, r['test_scales']))}"
              for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 3), 4.5))
    for ax, key in zip(axes, ("top1", "top5")):
        ours = [r[key] for r in rows]
        ax.bar(x - 0.2, [r[f"paper_{key}"] for r in rows], 0.4, label="paper")
        ax.bar(x + 0.2, [v if v is not None else 0 for v in ours], 0.4, label="ours")
        for i in (i for i, v in enumerate(ours) if v is None):
            ax.text(x[i] + 0.2, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
        top = max([r[f"paper_{key}"] for r in rows] + [v for v in ours if v is not None])
        ax.set_ylim(0, top * 1.25)  # room for the legend above the bars
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"{key[:3]}-{key[3:]} error (%)")
        ax.set_title(f"Table {number} ({table['title']}): {key[:3]}-{key[3:]} error", fontsize=10)
        ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_tables(report, runs_dir):
    """RUNS/tables.json, tables.md and tableN.png, each written to a temporary name and renamed."""
    from .runs import atomic_path, write_json_atomic

    os.makedirs(runs_dir, exist_ok=True)
    paths = [os.path.join(runs_dir, "tables.json"), os.path.join(runs_dir, "tables.md")]
    write_json_atomic(paths[0], report)
    with atomic_path(paths[1]) as tmp, open(tmp, "w") as f:
        f.write(report_markdown(report))
    for number, table in report["tables"].items():
        paths.append(os.path.join(runs_dir, f"table{number}.png"))
        plot_table(table, number, paths[-1])
    return paths
