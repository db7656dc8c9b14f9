"""A linear SVM on transfer features (PAPER.md section 6, the paper's Appendix B and Table 11).

The descriptors of `features.py` (L2-normalised) train a one-vs-rest linear SVM (scikit-learn's `LinearSVC`), its C
chosen on a held-out 20 % of the training set (the paper's procedure) unless given. Two protocols:

    single-label   mean class recall (%): the mean over classes of the fraction of each class's test images
                   classified as it. The Caltech protocol (`splits`): N seeded random splits of K training images per
                   class (and up to M test images per class from the rest), mean +- std over the splits.
    multi-label    the VOC protocol: one binary SVM per class; per-class average precision and their mean (mAP),
                   images where a class is present only as difficult objects (label -1) ignored for that class.
                   AP is scikit-learn's `average_precision_score` (the area under the precision-recall steps, not
                   VOC 2007's 11-point interpolation).

`run_transfer` writes a report (JSON, markdown shaped like the paper's Table 11, and a PNG of the per-class
recalls or APs).
"""

import json
import os
import warnings

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

from .features import extract_features, load_features
from .report import format_test_scales, report_paths
from .runs import atomic_path, write_json_atomic

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
HOLDOUT_FRACTION = 0.2  # of the training set, to choose C (the paper's 20 %)
MAX_ITER = 10000


# --- the classifier -------------------------------------------------------------------------------------------------

class LinearSVM:
    """One-vs-rest linear SVMs (LinearSVC, squared hinge loss, L2 penalty) over `num_classes` classes.

    fit(features float32 [n, d], labels): labels int [n] (single-label: one SVM per class, against the rest) or
    int8 [n, num_classes] (multi-label: 1 positive, 0 negative, -1 ignored for that class). `scores(features)`
    gives decision values float64 [n, num_classes]; a class without training examples of both kinds scores -inf
    (single-label) or a constant (multi-label).
    """

    def __init__(self, c, num_classes, seed=0):
        if not c > 0:
            raise ValueError(f"--c {c}: the SVM's C must be positive")
        self.c, self.num_classes, self.seed = float(c), int(num_classes), seed

    def _svc(self):
        return LinearSVC(C=self.c, max_iter=MAX_ITER, random_state=self.seed)

    def fit(self, features, labels):
        labels = np.asarray(labels)
        self.multilabel = labels.ndim == 2
        if self.multilabel:
            self.per_class = []
            for k in range(self.num_classes):
                keep = labels[:, k] >= 0
                target = labels[keep, k] == 1
                if target.all() or not target.any():  # one kind only: nothing to separate
                    self.per_class.append(1.0 if target.all() and target.size else -1.0)
                else:
                    self.per_class.append(self._svc().fit(features[keep], target))
        else:
            self.classes = np.unique(labels)
            self.svc = self._svc().fit(features, labels) if len(self.classes) > 1 else None
        return self

    def scores(self, features):
        n = len(features)
        if self.multilabel:
            return np.stack([np.full(n, svc) if isinstance(svc, float) else svc.decision_function(features)
                             for svc in self.per_class], axis=1)
        out = np.full((n, self.num_classes), -np.inf)
        if self.svc is None:
            out[:, self.classes[0]] = 0.0
            return out
        values = self.svc.decision_function(features)
        if values.ndim == 1:  # two classes: sklearn gives the second class's margin only
            values = np.stack([-values, values], axis=1)
        out[:, self.classes] = values
        return out


# --- metrics ------------------------------------------------------------------------------------------------------

def class_recalls(labels, predictions, num_classes):
    """Per-class recall in % float64 [num_classes] (NaN for a class with no test image) of int predictions [n]
    against labels [n]."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    recalls = np.full(num_classes, np.nan)
    for k in range(num_classes):
        members = labels == k
        if members.any():
            recalls[k] = 100.0 * np.mean(predictions[members] == k)
    return recalls


def mean_class_recall(labels, predictions, num_classes):
    """Mean class recall in % (the Caltech measure): the mean of `class_recalls` over the classes with test images."""
    return float(np.nanmean(class_recalls(labels, predictions, num_classes)))


def average_precisions(targets, scores):
    """Per-class average precision in % float64 [classes] (the VOC measure) of scores [n, classes] against targets
    int [n, classes] (1 positive, 0 negative, -1 ignored: difficult only). NaN for a class with no positive."""
    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    aps = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        keep = targets[:, k] >= 0
        positives = targets[keep, k] == 1
        if positives.any():
            aps[k] = 100.0 * average_precision_score(positives, scores[keep, k])
    return aps


def mean_average_precision(targets, scores):
    """mAP in %: the mean of `average_precisions` over the classes with positives."""
    return float(np.nanmean(average_precisions(targets, scores)))


def evaluate_svm(svm, features, labels):
    """(headline %, per-class % [classes]): mean class recall for single-label labels, mAP for multi-label."""
    scores = svm.scores(features)
    if np.asarray(labels).ndim == 2:
        per_class = average_precisions(labels, scores)
    else:
        per_class = class_recalls(labels, np.argmax(scores, axis=1), svm.num_classes)
    return float(np.nanmean(per_class)), per_class


# --- splits and the choice of C -----------------------------------------------------------------------------------

def holdout_split(labels, fraction=HOLDOUT_FRACTION, seed=0):
    """(fit indices, held-out indices) of a training set: single-label labels [n] stratified (round(fraction * n)
    of each class held out, at least one image of each class kept for fitting), multi-label [n, classes] a random
    `fraction` of the images."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        order = rng.permutation(len(labels))
        cut = int(round(fraction * len(labels)))
        return np.sort(order[cut:]), np.sort(order[:cut])
    held = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        held[members[:min(int(round(fraction * len(members))), len(members) - 1)]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def choose_c(features, labels, num_classes, grid=C_GRID, fraction=HOLDOUT_FRACTION, seed=0):
    """(best C, [{"c", "score"}]): each C of `grid` fitted on the training set less a held-out `fraction` and scored
    (mean class recall or mAP, %) on that part; ties go to the smaller C."""
    fit, held = holdout_split(labels, fraction, seed)
    if len(held) == 0:
        raise ValueError(f"cannot choose C: {len(labels)} training images leave none to hold out; pass --c")
    table = []
    for c in grid:
        svm = LinearSVM(c, num_classes, seed).fit(features[fit], labels[fit])
        table.append({"c": c, "score": round(evaluate_svm(svm, features[held], labels[held])[0], 4)})
    best = max(table, key=lambda row: (np.nan_to_num(row["score"], nan=-1.0), -row["c"]))
    return best["c"], table


def caltech_splits(labels, train_per_class, test_per_class=None, n_splits=3, seed=0, class_names=None):
    """The Caltech protocol's splits: a list of n_splits (train indices, test indices), each drawing
    `train_per_class` random training images of every class and up to `test_per_class` (all the rest when None)
    test images from the rest. Seeded: the same seed gives the same splits. Raises ValueError naming a class with
    no image left for testing."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("the Caltech protocol (--splits) is for single-label data; multi-label data uses mAP")
    if train_per_class < 1 or n_splits < 1 or (test_per_class is not None and test_per_class < 1):
        raise ValueError(f"--splits {n_splits} --train-per-class {train_per_class} --test-per-class "
                         f"{test_per_class}: must be positive")
    classes = np.unique(labels)
    for k in classes:
        count = int(np.sum(labels == k))
        if count <= train_per_class:
            name = class_names[k] if class_names is not None else k
            raise ValueError(f"class {name!r} has {count} images: --train-per-class {train_per_class} leaves none "
                             "to test on")
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(n_splits):
        train, test = [], []
        for k in classes:
            members = rng.permutation(np.flatnonzero(labels == k))
            train.append(members[:train_per_class])
            rest = members[train_per_class:]
            test.append(rest if test_per_class is None else rest[:test_per_class])
        splits.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return splits


# --- the experiment -----------------------------------------------------------------------------------------------

def _check_compatible(train, val):
    if val is None:
        return
    if train["features"].shape[1] != val["features"].shape[1]:
        raise ValueError(f"{val['path']}: {val['features'].shape[1]}-D features, {train['path']} has "
                         f"{train['features'].shape[1]}-D (extract both with the same models and flags)")
    if train["class_names"] != val["class_names"]:
        raise ValueError(f"{val['path']} and {train['path']} have different classes")
    for key in ("layer", "scales", "combine", "flip"):
        if train["settings"].get(key) != val["settings"].get(key):
            raise ValueError(f"{val['path']} was extracted with {key} {val['settings'].get(key)!r}, {train['path']} "
                             f"with {train['settings'].get(key)!r}")
    if np.asarray(train["labels"]).ndim != np.asarray(val["labels"]).ndim:
        raise ValueError(f"{val['path']} and {train['path']}: one is multi-label, the other not")


def _fit_and_score(train_x, train_y, test_x, test_y, num_classes, c, grid, seed):
    search = None
    if c is None:
        c, search = choose_c(train_x, train_y, num_classes, grid, seed=seed)
    svm = LinearSVM(c, num_classes, seed).fit(train_x, train_y)
    score, per_class = evaluate_svm(svm, test_x, test_y)
    return {"c": c, "c_search": search, "score": score, "per_class": per_class}


def method_name(settings):
    """'D & E (fc2, Q {256,384,512}, average)': the models, layer, scales and combination of a feature file."""
    models = " & ".join(m["config"] for m in settings.get("models", [])) or "?"
    return (f"VGG {models} ({settings.get('layer', '?')}, Q {format_test_scales(settings.get('scales', ['?']))}, "
            f"{settings.get('combine', '?')})")


def run_transfer(train, val=None, c=None, grid=C_GRID, splits=None, train_per_class=None, test_per_class=None,
                 seed=0, out=None):
    """`vgg-keras transfer`: the linear SVM on the feature files (or `load_features` dicts) `train` and `val`.

    Without `splits`: fit on train (C given, or chosen on a held-out 20 % of it), score val: mean class recall (%)
    or, for multi-label labels, mAP (%). With `splits` (single-label only): the Caltech protocol over the images of
    train and val together (`caltech_splits`), mean +- std over splits. Writes `out` (JSON), its markdown beside it
    and a PNG of the per-class scores. Returns the report.
    """
    train = load_features(train) if isinstance(train, str | os.PathLike) else train
    val = load_features(val) if isinstance(val, str | os.PathLike) else val
    _check_compatible(train, val)
    class_names = train["class_names"]
    multilabel = np.asarray(train["labels"]).ndim == 2
    if splits:
        if train_per_class is None:
            raise ValueError("--splits needs --train-per-class K (Caltech-101: 30, Caltech-256: 60)")
        pool_x = np.concatenate([train["features"]] + ([val["features"]] if val else []))
        pool_y = np.concatenate([train["labels"]] + ([val["labels"]] if val else []))
        results = [_fit_and_score(pool_x[tr], pool_y[tr], pool_x[te], pool_y[te], len(class_names), c, grid, seed)
                   for tr, te in caltech_splits(pool_y, train_per_class, test_per_class, splits, seed, class_names)]
        protocol = {"name": "caltech", "splits": splits, "train_per_class": train_per_class,
                    "test_per_class": test_per_class, "seed": seed, "pool_images": len(pool_y)}
    else:
        if val is None:
            raise ValueError("--features-val is needed (or --splits N --train-per-class K for the Caltech protocol)")
        results = [_fit_and_score(train["features"], train["labels"], val["features"], val["labels"],
                                  len(class_names), c, grid, seed)]
        protocol = {"name": "voc" if multilabel else "train/val", "train_images": len(train["labels"]),
                    "test_images": len(val["labels"])}
    scores = [r["score"] for r in results]
    with warnings.catch_warnings():  # a class with no test image in any split stays NaN ("n/a"), silently
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean([r["per_class"] for r in results], axis=0)
    report = {
        "method": method_name(train["settings"]),
        "data": train["settings"].get("data"),
        "metric": "mean AP" if multilabel else "mean class recall",
        "score": round(float(np.mean(scores)), 2),
        "std": round(float(np.std(scores)), 2) if len(scores) > 1 else None,
        "split_scores": [round(s, 2) for s in scores],
        "protocol": protocol,
        "c": [r["c"] for r in results],
        "c_search": [r["c_search"] for r in results],
        "per_class": {name: (None if np.isnan(v) else round(float(v), 2)) for name, v in zip(class_names, per_class)},
        "features": {"train": train.get("path"), "val": val.get("path") if val else None,
                     "dim": int(train["features"].shape[1]), "settings": train["settings"]},
    }
    print(markdown_table(report))
    if out:
        print("written to " + " and ".join(write_transfer_report(report, out)))
    return report


def transfer(features_train=None, features_val=None, models=None, data=None, feature_options=None, **protocol):
    """`vgg-keras transfer`: `run_transfer` on the feature files, or with `models` and `data` on features extracted
    first from the train and val splits (written to features_train / features_val when given; `feature_options`
    go to `extract_features`). protocol: the keywords of `run_transfer` (c, splits, train_per_class, ...)."""
    if models:
        if not data:
            raise ValueError("--model needs --data (the data set to transfer to)")
        features_train = extract_features(models, data, "train", out=features_train, **(feature_options or {}))
        features_val = extract_features(models, data, "val", out=features_val, **(feature_options or {}))
    elif not features_train:
        raise ValueError("pass --features-train FILE (and --features-val FILE), or --model RUN --data SRC")
    return run_transfer(features_train, features_val, **protocol)


# --- the report ---------------------------------------------------------------------------------------------------

def format_score(report):
    return f"{report['score']:.1f}" + (f" ± {report['std']:.1f}" if report.get("std") is not None else "")


def markdown_table(report):
    """The report as the paper's Table 11 row (method | data set (metric)), the protocol, and per-class scores."""
    protocol = report["protocol"]
    if protocol["name"] == "caltech":
        test = "the rest" if protocol["test_per_class"] is None else f"up to {protocol['test_per_class']}"
        how = (f"{protocol['splits']} random splits of {protocol['train_per_class']} training images per class "
               f"({test} for testing) from {protocol['pool_images']} images, seed {protocol['seed']}")
    else:
        how = f"trained on {protocol['train_images']} images, tested on {protocol['test_images']}"
    c_values = sorted(set(report["c"]))
    lines = [f"| method | {report['data']} ({report['metric']}, %) |", "|---|---:|",
             f"| {report['method']} | {format_score(report)} |", "",
             f"{how}; linear SVM (one-vs-rest), C = {', '.join(f'{c:g}' for c in c_values)}"
             f"{' (chosen on a held-out 20 % of the training set)' if report['c_search'][0] else ''}; "
             f"{report['features']['dim']}-D features.", "",
             f"| class | {'AP' if report['metric'] == 'mean AP' else 'recall'} (%) |", "|---|---:|"]
    lines += [f"| {name} | {'n/a' if v is None else f'{v:.1f}'} |" for name, v in report["per_class"].items()]
    return "\n".join(lines) + "\n"


def plot_per_class(report, path):
    """A bar per class (recall or AP, %) with the mean as a line, saved (atomically) as `path` (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_class"])
    values = [np.nan if v is None else v for v in report["per_class"].values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.axhline(report["score"], color="tab:red", linestyle="--", label=f"{report['metric']} {format_score(report)}")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel(("AP" if report["metric"] == "mean AP" else "recall") + " (%)")
    ax.set_title(f"{report['method']} on {report['data']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_transfer_report(report, out):
    """Write `report` to `out` (JSON), its markdown and its per-class PNG beside it; returns the three paths."""
    json_path, markdown_path = report_paths(out)
    png_path = os.path.splitext(out)[0] + ".png"
    write_json_atomic(json_path, json.loads(json.dumps(report, default=_json_default)))
    with atomic_path(markdown_path) as tmp, open(tmp, "w") as f:
        f.write(markdown_table(report))
    plot_per_class(report, png_path)
    return json_path, markdown_path, png_path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
