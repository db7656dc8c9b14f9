"""`vgg-keras reproduce`: the plan's order, --dry-run, resuming a killed plan, plan errors, and the report."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from vgg_keras import cli
from vgg_keras.reproduce import (PlanError, build_report, load_plan, report_markdown, resolve, trend_checks,
                                 write_tables)

from test_train import ENV, make_folder_dataset

PIPELINES = pathlib.Path(__file__).resolve().parents[1] / "pipelines"
PAPER = PIPELINES / "paper.toml"

# A, and A fine-tuned from it with scale jittering, at the smallest size (crop 32), one epoch each.
TINY_PLAN = """
[settings]
epochs = 1

[train]
crop = 32
batch_size = 4
init = "glorot"
lr = 0.001

[runs.A1]
config = "A"
scale = "36"

[runs.A2]
config = "A"
scale = "36:44"
finetune_from = "A1"

[[table3]]
runs = ["A1"]
method = "dense"
scales = [36]
error = [29.6, 10.4]

[[table4]]
runs = ["A2"]
method = "dense"
scales = [36, 40, 44]
error = [26.3, 8.2]
"""


def write_plan(tmp_path, text, name="plan.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the order -------------------------------------------------------------------------------------------

def test_plan_order_for_all_tables_puts_every_dependency_first():
    plan = load_plan(PAPER)
    schedule = resolve(plan, "SRC", "runs/paper")
    order = schedule.order
    assert order[0] == "A-256"
    assert sorted(order) == sorted(plan.runs)  # Tables 3-6 need every run
    for name in order:
        for key in ("init_from", "finetune_from"):
            if key in plan.runs[name]:
                assert order.index(plan.runs[name][key]) < order.index(name), (name, key)
    # every row of every table is given by exactly one evaluation, and fewer evaluations than rows are run
    given = [row.key for e in schedule.evaluations for row in e.rows]
    assert sorted(given) == sorted(row.key for rows in plan.tables.values() for row in rows)
    assert len(schedule.evaluations) < len(given)
    fusion = [e for e in schedule.evaluations if len(e.runs) == 2]
    assert len(fusion) == 1 and fusion[0].method == "multicrop+dense"
    assert {row.table for row in fusion[0].rows} == {4, 5, 6}  # members' rows come from the fusion's evaluation


def test_only_trains_the_named_runs_and_their_dependencies():
    schedule = resolve(load_plan(PAPER), "SRC", "runs/paper", tables=[3], only=["D-384"], shrink=7, epochs=2)
    assert schedule.order == ["A-256", "D-256", "D-384"]
    assert [row.runs for row in schedule.rows] == [("A-256",), ("D-256",), ("D-384",)]
    d384 = schedule.trainings["D-384"]
    assert (d384.scale, d384.crop, d384.epochs, d384.lr) == ((55, 55), 32, 2, 0.001)
    assert d384.finetune_from == os.path.join("runs/paper", "D-256")


def test_shrink_divides_scales_and_crop_and_keeps_the_crop_at_least_32():
    plan = load_plan(PAPER)
    schedule = resolve(plan, "SRC", "runs", shrink=7)
    assert schedule.trainings["C-256-512"].scale == (37, 73) and schedule.trainings["C-256-512"].crop == 32
    row = next(r for r in plan.tables[4] if r.runs == ("C-256-512",))
    assert schedule.our_scales(row) == (37, 55, 73)
    big = resolve(plan, "SRC", "runs", shrink=10)
    assert big.trainings["A-256"].crop == 32 and big.trainings["A-256"].scale == (32, 32)  # S is at least the crop
    assert resolve(plan, "SRC", "runs").trainings["A-256"].crop == 224


# --- errors ----------------------------------------------------------------------------------------------

def test_a_cycle_is_an_error_naming_its_runs(tmp_path):
    plan = TINY_PLAN.replace('[runs.A1]\nconfig = "A"\n', '[runs.A1]\nconfig = "A"\nfinetune_from = "A2"\n')
    with pytest.raises(PlanError, match=r"runs (A1 -> A2 -> A1|A2 -> A1 -> A2) form a cycle"):
        resolve(load_plan(write_plan(tmp_path, plan)), "SRC", "runs")


def test_a_missing_dependency_is_an_error_naming_it(tmp_path):
    plan = TINY_PLAN.replace('finetune_from = "A1"', 'finetune_from = "A9"')
    with pytest.raises(PlanError, match="run A2 depends on 'A9', which the plan does not define"):
        resolve(load_plan(write_plan(tmp_path, plan)), "SRC", "runs")
    with pytest.raises(PlanError, match="--only names 'Z'"):
        resolve(load_plan(PAPER), "SRC", "runs", only=["Z"])


def test_an_unknown_table_is_an_error_naming_it(capsys):
    assert cli.main(["reproduce", "--plan", str(PAPER), "--data", "SRC", "--tables", "3,7", "--dry-run"]) == 2
    assert "has no table 7 (it has 3, 4, 5, 6)" in capsys.readouterr().err


def test_unknown_keys_in_a_plan_are_refused(tmp_path):
    with pytest.raises(PlanError, match="run A1: unknown key.*scael"):
        load_plan(write_plan(tmp_path, TINY_PLAN.replace('scale = "36"\n\n[runs.A2]', 'scael = "36"\n\n[runs.A2]')))


# --- --dry-run -------------------------------------------------------------------------------------------

def test_dry_run_prints_each_step_as_a_command_and_runs_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert not cli.main(["reproduce", "--plan", str(PIPELINES / "demo.toml"), "--data", "data/demo",
                         "--runs-dir", str(runs), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    trains = [line for line in lines if line.startswith("vgg-keras train")]
    evals = [line for line in lines if line.startswith("vgg-keras eval")]
    assert [line.split("--run-dir ")[1].split()[0] for line in trains] == [
        str(runs / name) for name in ("A-256", "A-LRN-256", "B-256", "D-256", "D-384")]
    assert trains[0].startswith(f"vgg-keras train --config A --data data/demo --run-dir {runs / 'A-256'} "
                                "--scale 37 --crop 32 --epochs 2 --batch-size 32 --init glorot")
    assert f"--finetune-from {runs / 'D-256'}" in trains[4] and "--scale 55" in trains[4] and "--lr 0.001" in trains[4]
    assert all(line.endswith(": new") for line in trains)
    assert len(evals) == 5 and f"--model {runs / 'D-384'} --data data/demo --method dense --scales 55 " in evals[4]
    assert not runs.exists()


# --- a killed plan resumes -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_plan_resumes_without_retraining_a_finished_run(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "data", classes=2, per_class=4)
    plan, runs = write_plan(tmp_path, TINY_PLAN), tmp_path / "runs"
    args = [sys.executable, "-m", "vgg_keras.cli", "reproduce", "--plan", str(plan), "--data", str(data),
            "--runs-dir", str(runs)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = runs / "A1" / "state.json"
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline and '"finished": true' not in (
            first.read_text() if first.exists() else ""):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(first.read_text())["finished"]
    assert not (runs / "tables.json").exists()
    best = (runs / "A1" / "best.keras").stat().st_mtime_ns

    result = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[reproduce 1/4, 3 left after this" in result.stdout and "train A1: finished, skipped" in result.stdout
    assert (runs / "A1" / "best.keras").stat().st_mtime_ns == best
    assert "val_top1" in (runs / "A1" / "train.log").read_text()  # what training printed, also in its log
    report = json.loads((runs / "tables.json").read_text())
    ours = {row["runs"][0]: row["top1"] for table in report["tables"].values() for row in table["rows"]}
    assert set(ours) == {"A1", "A2"} and all(0 <= v <= 100 for v in ours.values())
    assert all(report["runs"][name]["finished"] for name in ("A1", "A2"))
    assert (runs / "table3.png").stat().st_size > 0 and (runs / "table4.png").stat().st_size > 0

    # a third time everything is done: the dry run says so
    assert not cli.main(args[3:] + ["--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    statuses = [line.rsplit("# ", 1)[1] for line in lines if line.startswith("vgg-keras")]
    assert statuses == ["A1: finished", "A2: finished", "done: table 3 A1 dense", "done: table 4 A2 dense"]


def test_a_failed_run_stops_the_plan_with_its_name_and_log(tmp_path):
    data = make_folder_dataset(tmp_path / "data", classes=2, per_class=4)
    plan = write_plan(tmp_path, TINY_PLAN.replace('scale = "36"\n\n[runs.A2]', 'scale = "36"\nlr = 1e30\n\n[runs.A2]'))
    from vgg_keras.reproduce import reproduce

    with pytest.raises(PlanError, match=r"run A1 failed: FloatingPointError: .*NaN.*\(log: .*A1/train.log\)"):
        reproduce(str(plan), str(data), str(tmp_path / "runs"), tables=[3])
    assert "FloatingPointError" in (tmp_path / "runs" / "A1" / "train.log").read_text()
    assert not (tmp_path / "runs" / "A2").exists()


# --- the report ------------------------------------------------------------------------------------------

def test_report_has_paper_and_our_columns_and_the_trend_checks(tmp_path):
    plan = load_plan(PAPER)
    schedule = resolve(plan, "data/demo", str(tmp_path), shrink=7, epochs=2)
    # our errors: the paper's plus an offset per row, so each trend's difference is known
    offsets = {("A-256",): 0.0, ("A-LRN-256",): 0.2, ("B-256",): 1.0, ("D-256",): -2.0}
    results = {row.key: (row.paper[0] + offsets.get(row.runs, 0.0), row.paper[1]) for row in plan.tables[3]
               if row.runs in offsets}
    report = build_report(schedule, results)
    markdown = report_markdown(report)
    assert "| config | train S | test Q | method | top-1 paper | top-1 ours | top-5 paper | top-5 ours |" in markdown
    assert "| A-LRN | 256 (37) | 256 (37) | dense | 29.7 | 29.9 | 10.5 | 10.5 |" in markdown
    assert "| E | [256;512] ([37;73]) | 384 (55) | dense | 25.5 | — | 8.0 | — |" in markdown
    trends = {t["number"]: t for t in report["trends"]}
    assert len(trends) == 7
    assert trends[1]["statement"] == \
        "1. LRN does not help: A-LRN top-1 − A top-1 = +0.3 (paper +0.1) → holds"
    # B: 28.7 + 1.0 - 29.6 = +0.1 (paper -0.9): does not hold; D - B = 27.0 - 2 - 29.7 = -4.7 (paper -1.7): holds
    assert trends[2]["verdict"] == "holds in 1 of 2" and "B top-1 − A top-1 = +0.1 (paper -0.9)" in \
        trends[2]["statement"] and "D top-1 − B top-1 = -4.7 (paper -1.7)" in trends[2]["statement"]
    assert trends[7]["statement"] == ("7. Fusing models helps: none of its 3 comparisons was run (paper: -0.8, -0.7, "
                                      "-0.7) → not measured")
    assert "E top-1 − D top-1 = not run (paper +0.3)" in trends[2]["statement"]
    for t in report["trends"]:
        assert t["statement"] in markdown
    paths = write_tables(report, str(tmp_path))
    assert json.loads((tmp_path / "tables.json").read_text())["settings"]["shrink"] == 7
    assert [os.path.basename(p) for p in paths] == ["tables.json", "tables.md", "table3.png", "table4.png",
                                                    "table5.png", "table6.png"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_trends_follow_the_sign_the_paper_predicts():
    plan = load_plan(PAPER)
    # the paper's own numbers satisfy its trends (E ≈ D is shown, not judged)
    paper = {row.key: row.paper for rows in plan.tables.values() for row in rows}
    assert [t["verdict"] for t in trend_checks(plan, paper)] == ["holds"] * 7
    reversed_ = {key: (100 - top1, top5) for key, (top1, top5) in paper.items()}
    assert all(t["verdict"] == "does not hold" for t in trend_checks(plan, reversed_))
