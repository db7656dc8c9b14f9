"""`make bench`: run every bench/bench_*.py, collect their records into bench/latest.json, print a table.

Each benchmark module has `run() -> list[dict]` returning records
{"name", "ours", "reference", "ratio", "unit", "higher_is_better", "notes"} (extra fields allowed).
`python bench/run.py NAME...` runs only the named modules (e.g. bench_train_step).
"""

import importlib.util
import json
import pathlib
import sys
import time

import vgg_keras  # noqa: F401  (first: it chooses TensorFlow's oneDNN kernels before a benchmark imports TF)

HERE = pathlib.Path(__file__).resolve().parent
FIELDS = ("name", "ours", "reference", "ratio", "unit", "higher_is_better", "notes")


def main(names):
    out = HERE / "latest.json"
    previous = {r["name"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    modules = sorted(HERE.glob("bench_*.py"))
    if names:
        modules = [m for m in modules if m.stem in names]
    for path in modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.stem}", flush=True)
        start = time.time()
        for record in module.run():
            missing = [f for f in FIELDS if f not in record]
            if missing:
                raise ValueError(f"{path.name}: record {record.get('name')} lacks {missing}")
            previous[record["name"]] = record
        print(f"   ({time.time() - start:.0f} s)")
    records = list(previous.values())
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\n{'name':<36}{'ours':>12}{'reference':>12}{'ratio':>8}  unit")
    for r in records:
        print(f"{r['name']:<36}{r['ours']:>12.3f}{r['reference']:>12.3f}{r['ratio']:>8.2f}  {r['unit']}"
              f"  ({'higher' if r['higher_is_better'] else 'lower'} is better)")
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
