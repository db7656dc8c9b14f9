"""`make bench`: run every bench/bench_*.py, write this run's records to bench/latest.json, print a table.

Each benchmark module has `RECORDS` (the names of the records it writes) and `run() -> list[dict]` returning records
{"name", "ours", "reference", "ratio", "unit", "higher_is_better", "notes"} (extra fields allowed).
latest.json holds only this run's records, each stamped with the commit, the time and the CPU line
(`machine.cpu_line()`); a benchmark that cannot run (missing data, an error) leaves a record per name saying why,
with null numbers, instead of disappearing or leaving an old record looking current.
`python bench/run.py NAME...` runs only the named modules, in that order (e.g. bench_train_step).
"""

import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as `make bench` sets it

import vgg_keras  # noqa: F401  (first: it chooses TensorFlow's oneDNN kernels before a benchmark imports TF)
from vgg_keras import machine

HERE = pathlib.Path(__file__).resolve().parent
FIELDS = ("name", "ours", "reference", "ratio", "unit", "higher_is_better", "notes")


def commit():
    """The checked-out commit, with "+dirty" when the work tree has changes; "unknown" outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def not_run(name, reason):
    return {"name": name, "ours": None, "reference": None, "ratio": None, "unit": "", "higher_is_better": True,
            "notes": f"not run: {reason}", "status": "not run"}


def run_module(path):
    """The records of one bench_*.py module; 'not run' records naming the reason where it raised."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    names = [path.stem]
    try:
        spec.loader.exec_module(module)
        names = list(getattr(module, "RECORDS", names))
        records = module.run()
    except Exception as err:  # a benchmark that cannot run says so in its records
        traceback.print_exc()
        return [not_run(name, f"{type(err).__name__}: {err}") for name in names]
    for record in records:
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise ValueError(f"{path.name}: record {record.get('name')} lacks {missing}")
    written = {record["name"] for record in records}
    return records + [not_run(name, "the benchmark returned no such record") for name in names if name not in written]


def _number(value, width, digits):
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def main(names):
    out = HERE / "latest.json"
    cpu = machine.cpu_line()
    print(cpu, flush=True)
    stamp = {"commit": commit(), "cpu": cpu}
    modules = sorted(HERE.glob("bench_*.py"))
    if names:  # in the order given
        unknown = set(names) - {m.stem for m in modules}
        if unknown:
            raise SystemExit(f"bench/run.py: no such benchmark {sorted(unknown)}; there are {[m.stem for m in modules]}")
        modules = [HERE / f"{name}.py" for name in names]
    records, begin = [], time.time()
    for path in modules:
        print(f"== {path.stem}", flush=True)
        start = time.time()
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        records += [{**record, **stamp, "time": when} for record in run_module(path)]
        print(f"   ({time.time() - start:.0f} s)", flush=True)
        out.write_text(json.dumps(records, indent=2) + "\n")  # this run's records only, so far
    print(f"\n{'name':<36}{'ours':>12}{'reference':>12}{'ratio':>8}  unit")
    for r in records:
        if r.get("status") == "not run":
            print(f"{r['name']:<36}{'':>12}{'':>12}{'':>8}  {r['notes']}")
            continue
        print(f"{r['name']:<36}{_number(r['ours'], 12, 3)}{_number(r['reference'], 12, 3)}"
              f"{_number(r['ratio'], 8, 2)}  {r['unit']}  ({'higher' if r['higher_is_better'] else 'lower'} is better)")
    print(f"written to {out} ({time.time() - begin:.0f} s in all)")


if __name__ == "__main__":
    main(sys.argv[1:])
