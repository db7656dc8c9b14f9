"""Evaluation reports: rows shaped like the paper's Tables 3-6, their markdown, report.json / report.md, and the
per-image predictions file."""

import csv
import json
import os

import numpy as np

from .runs import write_json_atomic

TABLE_COLUMNS = (("config", "config"), ("train_scale", "train S"), ("test_scales", "test Q"), ("method", "method"),
                 ("top1_error", "top-1 err. (%)"), ("top5_error", "top-5 err. (%)"))


def format_train_scale(scale):
    """(256, 256) -> '256'; (256, 512) -> '[256;512]' (the paper's notation); None -> '?'."""
    if not scale:
        return "?"
    smin, smax = scale
    return str(smin) if smin == smax else f"[{smin};{smax}]"


def format_test_scales(scales):
    """(384,) -> '384'; (256, 384, 512) -> '{256,384,512}'."""
    return str(scales[0]) if len(scales) == 1 else "{" + ",".join(str(q) for q in scales) + "}"


def evaluation_row(members, method, errors):
    """One table row: a model (or the fusion of `members`), a method and its {1: top-1, 5: top-5} errors (%)."""
    return {
        "config": " + ".join(m.config for m in members),
        "train_scale": " / ".join(format_train_scale(m.run.scale) for m in members),
        "test_scales": " / ".join(format_test_scales(m.scales) for m in members),
        "method": method,
        "top1_error": round(errors[1], 2),
        "top5_error": round(errors[5], 2),
        "fusion": len(members) > 1,
    }


def markdown_table(report):
    """The report as a markdown table like the paper's Tables 3-6, with a line of counts and timing."""
    lines = ["| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|" + "---|" * (len(TABLE_COLUMNS) - 2) + "---:|---:|"]
    for row in report["rows"]:
        cells = [f"{row[key]:.2f}" if key.endswith("error") else str(row[key]) for key, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    data = f" of {report['data']} ({report['split']})" if report.get("data") else ""
    skipped = f" ({len(report['skipped'])} undecodable skipped)" if report.get("skipped") else ""
    if report.get("bounded"):
        skipped += (f" ({len(report['bounded'])} above --max-pixels {report['max_pixels']}: dense at a smaller Q, "
                    "listed in the report)")
    lines.append("")
    lines.append(
        f"{report['images']} images{data}{skipped}; flip: {'yes' if report['flip'] else 'no'}; dense: "
        f"{report['dense_order']}; per image {report['crops_per_image']} crops and {report['dense_views_per_image']} "
        f"dense views; {report['wall_time_s']:.1f} s, {report['images_per_s'] or 0:.2f} images/s")
    return "\n".join(lines) + "\n"


def report_paths(out):
    """report.json -> (report.json, report.md)."""
    markdown = os.path.splitext(out)[0] + ".md"
    if markdown == out:
        raise ValueError(f"--out {out!r}: name the JSON report (e.g. report.json); the markdown goes beside it")
    return out, markdown


def write_report(report, out):
    """Write `report` to `out` (JSON) and its markdown table beside it; returns both paths."""
    json_path, markdown_path = report_paths(out)
    write_json_atomic(json_path, report)
    with open(markdown_path, "w") as f:
        f.write(markdown_table(report))
    return json_path, markdown_path


class PredictionWriter:
    """Per-image top-k predictions with class names: CSV for a `.csv` path, JSON lines otherwise.

    Use as a context manager; call it as `evaluate`'s on_image(id, label, posteriors).
    """

    def __init__(self, path, class_names, k=5):
        self.class_names, self.k = list(class_names), min(k, len(class_names))
        self._file = open(path, "w", newline="")
        self._csv = csv.writer(self._file) if path.endswith(".csv") else None
        if self._csv:
            self._csv.writerow(["id", "label"] + [f"{col}{i}" for i in range(1, self.k + 1)
                                                  for col in ("class", "probability")])

    def __call__(self, image_id, label, posteriors):
        top = np.argsort(-np.asarray(posteriors), kind="stable")[:self.k]  # ties: the lower class index first
        predictions = [(self.class_names[i], round(float(posteriors[i]), 6)) for i in top]
        if self._csv:
            self._csv.writerow([image_id, self.class_names[label]] + [v for pair in predictions for v in pair])
        else:
            self._file.write(json.dumps({"id": image_id, "label": self.class_names[label],
                                         f"top{self.k}": [list(pair) for pair in predictions]}) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
