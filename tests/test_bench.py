"""bench/run.py: latest.json holds this run's records only, stamped; a benchmark that cannot run says why."""

import importlib.util
import json
import pathlib

import pytest

RUN_PY = pathlib.Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.fixture
def bench_run(tmp_path, monkeypatch):
    """bench/run.py loaded with its folder moved to tmp_path (its modules and latest.json live there)."""
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(module.machine, "cpu_line", lambda: "CPU: test")
    return module


def write_module(folder, name, body):
    (folder / f"{name}.py").write_text(body)


GOOD = '''
RECORDS = ["good_a", "good_b"]
def run():
    return [{"name": "good_a", "ours": 2.0, "reference": 1.0, "ratio": 2.0, "unit": "x", "higher_is_better": True,
             "notes": ""}]
'''
FAILING = '''
RECORDS = ["needs_data"]
def run():
    raise FileNotFoundError("../shared/data/imagenet-samples does not exist")
'''


def test_only_this_runs_records_each_stamped_and_failures_named(bench_run, tmp_path):
    (tmp_path / "latest.json").write_text(json.dumps([{"name": "stale", "ours": 1.0}]))
    write_module(tmp_path, "bench_good", GOOD)
    write_module(tmp_path, "bench_failing", FAILING)
    bench_run.main([])
    records = {r["name"]: r for r in json.loads((tmp_path / "latest.json").read_text())}
    assert set(records) == {"good_a", "good_b", "needs_data"}  # the stale record is gone
    assert records["good_a"]["ratio"] == 2.0 and "status" not in records["good_a"]
    assert records["good_b"]["status"] == "not run" and "returned no such record" in records["good_b"]["notes"]
    assert records["needs_data"]["ours"] is None
    assert "FileNotFoundError" in records["needs_data"]["notes"] and "imagenet-samples" in records["needs_data"]["notes"]
    for record in records.values():
        assert record["cpu"] == "CPU: test" and record["commit"] and record["time"]


def test_unknown_benchmark_name_is_an_error(bench_run, tmp_path):
    write_module(tmp_path, "bench_good", GOOD)
    with pytest.raises(SystemExit, match="bench_nope"):
        bench_run.main(["bench_nope"])
