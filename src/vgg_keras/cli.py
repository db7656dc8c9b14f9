"""`vgg-keras` command line: each subcommand parses its flags and calls one function of the package."""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_summary(args):
    from .summary import print_summary

    print_summary(args.config, args.input_size, args.num_classes)


def cmd_export(args):
    from .evaluate import parse_scales
    from .export import export

    scales = parse_scales(args.scales) if args.scales else None
    extend = None
    if args.localisation:
        from .localisation import localise_extension

        extend = localise_extension(args.localisation)
    path = export(args.model, args.name, scales, args.top_k, args.out, extend=extend, **max_pixels(args))
    print(f"exported {path}")


def cmd_eval(args):
    from .evaluate import parse_scales, run_evaluation

    run_evaluation(args.model, data=args.data, split=args.split, method=args.method,
                   scales=parse_scales(args.scales) if args.scales is not None else None, flip=not args.no_flip,
                   out=args.out, predictions=args.predictions, softmax_first=args.softmax_first, limit=args.limit,
                   **max_pixels(args))


def cmd_predict(args):
    from .predict import predict

    return 1 if predict(args.saved_model, args.images, args.version, args.top_k) else 0


def cmd_train(args):
    from .data import parse_scale
    from .train import TrainConfig, train

    cfg = TrainConfig(
        config=args.config, data=args.data, run_dir=args.run_dir, data_dir=args.data_dir,
        manual_dir=args.manual_dir, scale=parse_scale(args.scale, flag="--scale"), crop=args.crop,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        dropout=args.dropout, init=args.init, init_std=args.init_std, init_from=args.init_from,
        finetune_from=args.finetune_from, plateau_patience=args.plateau_patience, stats=args.stats,
        val_fraction=args.val_fraction, mixed_precision=args.mixed_precision, xla=args.xla, seed=args.seed,
        layout=args.layout, val_labels=args.val_labels,
    )
    state = train(cfg)
    last = state["history"][-1] if state["history"] else {}
    print(f"\nRun finished: {cfg.run_dir} ({state['epoch']} epochs, best val top-1 {state['best_top1']:.3f}, "
          f"last val top-5 {last.get('val_top5', float('nan')):.3f})")
    print("Evaluate it:  make eval-multicrop   or   vgg-keras eval --model "
          f"{cfg.run_dir} --method multicrop+dense")
    print(f"Export it:    make export          or   vgg-keras export --model {cfg.run_dir} --name "
          f"vgg_{cfg.config.lower().replace('-', '_')}")


def cmd_train_localisation(args):
    from .data import parse_scale
    from .localisation import LocalisationConfig, train_localisation

    cfg = LocalisationConfig(
        from_run=args.from_run, data=args.data or "", boxes=args.boxes or "", regression=args.regression,
        fine_tune=args.fine_tune, run_dir=args.run_dir, scale=parse_scale(args.scale) if args.scale else None,
        crop=args.crop or 0, epochs=args.epochs, batch_size=args.batch_size or 0, lr=args.lr,
        plateau_patience=args.plateau_patience, seed=args.seed)
    state = train_localisation(cfg)
    print(f"\nRun finished: {cfg.run_dir} ({state['epoch']} epochs, best val mean IoU {state['best_top1']:.3f})")
    print(f"Evaluate it:  make eval-loc   or   vgg-keras eval-localisation --model {cfg.run_dir} "
          f"--classifier {cfg.from_run} --protocol dense")


def cmd_eval_localisation(args):
    from .evaluate import parse_scales
    from .localisation import run_localisation_eval

    run_localisation_eval(args.model, classifier=args.classifier, data=args.data, boxes=args.boxes,
                          split=args.split, protocol=args.protocol,
                          scales=parse_scales(args.scales) if args.scales else None, flip=not args.no_flip,
                          merge_iou=args.merge_iou, limit=args.limit, out=args.out, predictions=args.predictions,
                          figure=args.figure, **max_pixels(args))


def cmd_reproduce(args):
    from .reproduce import parse_list, reproduce

    reproduce(args.plan, args.data, args.runs_dir, tables=parse_list(args.tables, "--tables", int) or None,
              only=parse_list(args.only, "--only") or None, shrink=args.shrink, epochs=args.epochs, dry=args.dry_run)


def cmd_make_demo_data(args):
    from .data.demo import make_demo_data

    try:
        object_range = tuple(float(v) for v in args.object_range.split(":"))
        if len(object_range) != 2:
            raise ValueError
    except ValueError:
        raise ValueError(f"--object-range {args.object_range!r}: expected MIN:MAX, e.g. 0.5:0.9") from None
    annotations = make_demo_data(args.dir, train_per_class=args.train_per_class,
                                 val_per_class=args.val_per_class, seed=args.seed, object_range=object_range,
                                 centre_spread=args.centre_spread)
    print(f"{len(annotations['images'])} images of {len(annotations['classes'])} classes in {args.dir} "
          f"(boxes in {args.dir}/annotations.json)")


def _source(args):
    """The source of --data (with --data-dir, --manual-dir, --val-fraction, --seed): part of parsing the flags."""
    from .data import load_source

    return load_source(args.data, data_dir=args.data_dir, manual_dir=args.manual_dir,
                       val_fraction=args.val_fraction, seed=args.seed, layout=args.layout, val_labels=args.val_labels)


def cmd_prepare(args):
    from .data import prepare

    metadata = prepare(_source(args), args.out, shards=args.shards, seed=args.seed)
    counts = ", ".join(f"{split} {entry['num_examples']} images in {len(entry['files'])} shards"
                       for split, entry in metadata["splits"].items())
    print(f"{args.out}: {counts}; {len(metadata['skipped'])} undecodable files skipped")
    for file_id, reason in sorted(metadata["skipped"].items()):
        print(f"  skipped {file_id}: {reason}")


def cmd_stats(args):
    from .data import compute_stats

    stats = compute_stats(_source(args), split=args.split, max_images=args.max_images, seed=args.seed)
    stats.to_json(args.out)
    print(f"{args.out}: mean RGB {[round(v, 2) for v in stats.mean_rgb]}, eigenvalues "
          f"{[round(v, 5) for v in stats.eigenvalues]} ({stats.source})")


def cmd_check_data(args):
    from .data import check_data, parse_scale

    report = check_data(_source(args), scale=parse_scale(args.scale), crop=args.crop, seed=args.seed)
    print(report.format())
    if args.json:
        report.write_json(args.json)
        print(f"report written to {args.json}")
    return 0 if report.used else 1


def _feature_options(args):
    """The feature-extraction flags of `features` and `transfer --model`."""
    from .evaluate import parse_scales

    return dict(scales=parse_scales(args.scales), combine=args.combine, layer=args.layer, flip=not args.no_flip,
                limit=args.limit, data_options=dict(data_dir=args.data_dir, manual_dir=args.manual_dir,
                                                     val_fraction=args.val_fraction, seed=args.seed))


def cmd_features(args):
    from .features import extract_features

    result = extract_features(args.model, args.data, split=args.split, out=args.out, **_feature_options(args))
    timing = result["settings"]["timing"]
    print(f"{args.out}: {result['features'].shape[0]} images x {result['features'].shape[1]}-D features "
          f"({timing['images_per_s'] or 0:.2f} images/s in the networks)")


def cmd_transfer(args):
    from .transfer import transfer

    transfer(args.features_train, args.features_val, models=args.model, data=args.data,
             feature_options=_feature_options(args), c=args.c, splits=args.splits,
             train_per_class=args.train_per_class, test_per_class=args.test_per_class, seed=args.seed, out=args.out)


def _add_feature_flags(p):
    p.add_argument("--scales", default="256,384,512", help="test scales Q (default: the paper's 256,384,512)")
    p.add_argument("--combine", default="average", choices=["average", "stack"],
                   help="over the scales: average the descriptors (the paper's VOC setting) or stack them (Caltech)")
    p.add_argument("--layer", default="fc2", help="layer of the dense net to describe with (default fc2, 4096-D; "
                   "e.g. fc1, block5_pool)")
    p.add_argument("--no-flip", action="store_true", help="do not average in the mirror image's descriptor")
    p.add_argument("--limit", type=int, help="describe only the first N images of each split")


def _add_data_flags(p, seed_help="seed of the validation split (and of sampling)"):
    p.add_argument("--data", required=True, help="class-folder directory, TFRecord directory, or tfds:NAME[/CONFIG]")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--manual-dir", help="TFDS manual directory (imagenet2012: the ILSVRC tars)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation split when the data has no val/")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--layout", default="auto", choices=["auto", "classes", "splits"],
                   help="class folders: DATA/<class>/ (classes) or DATA/train/<class>/ and DATA/val/ (splits); auto: "
                   "splits when DATA holds only train/ (of folders) and val/ (README, Data)")
    p.add_argument("--val-labels", metavar="CSV", help="labels of a flat DATA/val/ of images: LOC_val_solution.csv "
                   "or file,label rows (default: found beside the data)")


def max_pixels(args):
    return {} if args.max_pixels is None else {"max_pixels": args.max_pixels}


def add_max_pixels(parser):
    parser.add_argument("--max-pixels", type=int, metavar="N", help="dense evaluation: at most N pixels of "
                        "rescaled image per view; larger images are evaluated at the largest Q that fits, banners "
                        "on their central part (default: 1048576 = 1024x1024; see README, Evaluation)")


def build_parser():
    parser = argparse.ArgumentParser(prog="vgg-keras", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="layer table, parameter count and multiply-adds of a configuration")
    p.add_argument("--config", required=True, help="A, A-LRN, B, C, D or E")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("make-demo-data", help="generate the embedded demo data set (shapes on clutter, with boxes)")
    p.add_argument("dir", help="an empty or new directory")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object-range", default="0.5:0.9", metavar="MIN:MAX",
                   help="object size as a fraction of the shorter image side (wider: boxes vary more)")
    p.add_argument("--centre-spread", type=float, default=0.15,
                   help="the object's centre lies within this fraction of the image's side from its centre")
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("prepare", help="convert a data source into sharded TFRecords (the fast path for large sets)")
    _add_data_flags(p, seed_help="seed of the validation split and of the record order")
    p.add_argument("--out", required=True, help="a new or empty directory for the shards and their metadata")
    p.add_argument("--shards", type=int, help="number of training shards (default: one per 1024 images)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("stats", help="mean RGB and RGB covariance eigen-decomposition of the training images")
    _add_data_flags(p, seed_help="seed of the validation split and of --max-images sampling")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--max-images", type=int, help="use a random sample of this many images")
    p.add_argument("--out", required=True, help="JSON file (e.g. stats.json) for train --stats")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("check-data", help="run the training transform over every image once; report what is used, "
                       "what is skipped and why, and the class counts (exit 1 when nothing is usable)")
    _add_data_flags(p, seed_help="seed of the validation split and of the augmentation")
    p.add_argument("--scale", default="256", help="training scale S: 256 (fixed) or 256:512 (jittered)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (written atomically)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("train", help="train a configuration with the paper's recipe (resumes an unfinished run)")
    p.add_argument("--config", default="A", help="A, A-LRN, B, C, D or E (default A)")
    _add_data_flags(p, seed_help="seed of the validation split, the initialisation and the augmentation")
    p.add_argument("--run-dir", required=True, help="where checkpoints, logs and the best model go")
    p.add_argument("--scale", default="256", help="training scale S: 256 (fixed) or 256:512 (jittered)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=74)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the replicas")
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate (not rescaled with the batch)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="Caffe semantics: gradient gains wd * w")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--init", default="paper", choices=["paper", "glorot"])
    p.add_argument("--init-std", type=float, default=0.01, help="std of the 'paper' normal initialisation")
    p.add_argument("--init-from", metavar="RUN", help="pre-initialise from a trained A (4 conv + 3 FC layers)")
    p.add_argument("--finetune-from", metavar="RUN", help="start from all weights of a run of the same config")
    p.add_argument("--plateau-patience", type=int, default=2, help="epochs without progress before lr / 10")
    p.add_argument("--stats", help="colour statistics JSON from `vgg-keras stats` (default: ImageNet's)")
    p.add_argument("--mixed-precision", action="store_true", help="float16 on GPUs (bfloat16 on CPU/TPU)")
    p.add_argument("--xla", action="store_true", help="jit-compile the train step (Keras disables 'auto' "
                   "under tf.distribute)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="TF Serving SavedModel doing dense evaluation, as saved_models/NAME/<version>")
    p.add_argument("--model", required=True, help="run directory (its best.keras) or .keras file")
    p.add_argument("--name", help="model name for TF Serving (default: vgg_<config>, e.g. vgg_a)")
    p.add_argument("--scales", help="test scales Q, e.g. 256,384,512 (default: the paper's for the training scale)")
    p.add_argument("--top-k", type=int, default=5, help="classes returned per image (default: 5)")
    add_max_pixels(p)
    p.add_argument("--out", default="saved_models", help="folder of exported models (default: saved_models)")
    p.add_argument("--localisation", metavar="LOCRUN", help="a localisation run of --model's classes: adds the "
                   "`localise` signature (top-k classes, scores and one box each, in image pixels)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="top-k classes of image files with an exported SavedModel")
    p.add_argument("--saved-model", required=True, help="saved_models/NAME (or one of its version folders)")
    p.add_argument("--version", type=int, help="version to load (default: the highest)")
    p.add_argument("--top-k", type=int, help="classes printed per image (default: all the model returns)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, GIF, BMP or WebP files")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="top-1 / top-5 error by centre crop, dense or multi-crop evaluation at "
                       "several scales; several --model are fused (PAPER.md section 3)")
    p.add_argument("--model", action="append", required=True, metavar="RUN_OR_FILE",
                   help="run directory (its best.keras) or .keras file; repeat to fuse models")
    p.add_argument("--data", help="class-folder directory, TFRecord directory, or tfds:NAME "
                   "(default: the data the first --model was trained on)")
    p.add_argument("--split", default="val", help="split of --data (default: val)")
    p.add_argument("--method", default="dense", metavar="METHOD",
                   help="center, dense, multicrop or multicrop+dense (default: dense)")
    p.add_argument("--scales", help="test scales Q, e.g. 256,384,512 (default: the paper's rule from each "
                   "model's training scale S: fixed S -> S-32,S,S+32; [Smin,Smax] -> Smin,(Smin+Smax)/2,Smax)")
    p.add_argument("--no-flip", action="store_true", help="do not average in horizontally flipped views")
    p.add_argument("--softmax-first", action="store_true", help="dense: soft-max each location of the score map, "
                   "then average (default: average the scores, then soft-max, as the paper)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    add_max_pixels(p)
    p.add_argument("--out", help="report as JSON (e.g. report.json); its markdown table goes beside it (report.md)")
    p.add_argument("--predictions", metavar="FILE", help="per-image top-5 with class names: CSV for FILE.csv, "
                   "JSON lines otherwise")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-localisation", help="fine-tune a classification run into a box-regression net "
                       "(PAPER.md section 5); resumes an unfinished run")
    p.add_argument("--from", dest="from_run", required=True, metavar="RUN",
                   help="classification run of the same configuration (all layers but the last are copied)")
    p.add_argument("--data", help="training data (default: the --from run's)")
    p.add_argument("--boxes", help="annotations.json, a folder of VOC/ILSVRC XML files or a Kaggle LOC CSV "
                   "(default: DATA/annotations.json)")
    p.add_argument("--regression", default="per-class", choices=["per-class", "single-class"])
    p.add_argument("--fine-tune", default="all", choices=["all", "fc"], help="all layers, or only fc1 and fc2")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--scale", help="training scale S (default: the --from run's)")
    p.add_argument("--crop", type=int, help="crop size (default: the --from run's)")
    p.add_argument("--epochs", type=int, default=74)
    p.add_argument("--batch-size", type=int, help="default: the --from run's")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (the paper's 1e-3)")
    p.add_argument("--plateau-patience", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_localisation)

    p = sub.add_parser("eval-localisation", help="localisation error (GT class, ILSVRC top-1 / top-5) by the "
                       "paper's centre-crop or dense protocol; several --model pool their boxes")
    p.add_argument("--model", action="append", required=True, metavar="LOCRUN", help="localisation run; repeat")
    p.add_argument("--classifier", metavar="RUN", help="classification run giving the top-5 guesses "
                   "(needed by --protocol dense)")
    p.add_argument("--data", help="default: the data the first --model was trained on")
    p.add_argument("--boxes", help="ground-truth boxes (default: the first --model's training boxes)")
    p.add_argument("--split", default="val")
    p.add_argument("--protocol", default="dense", choices=["center", "dense"])
    p.add_argument("--scales", help="test scales Q (default: center: the middle of the training scales; "
                   "dense: the paper's three)")
    p.add_argument("--merge-iou", type=float, default=0.5, help="greedy merging averages two boxes while their "
                   "IoU is at least this (default 0.5)")
    add_max_pixels(p)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--limit", type=int, help="evaluate only the first N images with boxes")
    p.add_argument("--out", help="report JSON (markdown beside it)")
    p.add_argument("--predictions", metavar="FILE", help="per-image guesses and boxes, JSON lines")
    p.add_argument("--figure", metavar="PNG", help="draw the first images with ground-truth and predicted boxes")
    p.set_defaults(func=cmd_eval_localisation)

    p = sub.add_parser("reproduce", help="the paper's Tables 3-6 as one resumable plan: train the runs in dependency "
                       "order, evaluate every row, write RUNS/tables.md (paper vs ours)")
    p.add_argument("--plan", default="pipelines/paper.toml", help="plan file (default: pipelines/paper.toml)")
    p.add_argument("--data", required=True, help="class-folder directory, TFRecord directory, or tfds:NAME[/CONFIG]")
    p.add_argument("--runs-dir", default="runs/paper", help="one run directory per run, evaluations, tables.md")
    p.add_argument("--tables", default="", help="tables to reproduce, e.g. 3,4 (default: the plan's, or all)")
    p.add_argument("--only", default="", metavar="RUN,...", help="train only these runs (and their dependencies); "
                   "evaluate the rows they make possible")
    p.add_argument("--shrink", type=int, help="divide every S, Q and the crop by K (crop >= 32)")
    p.add_argument("--epochs", type=int, help="cap every run at N epochs")
    p.add_argument("--dry-run", action="store_true", help="print each step as the vgg-keras command it stands for")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("features", help="transfer descriptors (PAPER.md section 6): dense penultimate-layer "
                       "activations at several scales, averaged spatially and over flips, L2-normalised, as .npz")
    p.add_argument("--model", action="append", required=True, metavar="RUN_OR_FILE",
                   help="run directory (its best.keras) or .keras file; repeat to stack models (the paper's D & E)")
    _add_data_flags(p)
    p.add_argument("--split", default="train", choices=["train", "val"])
    _add_feature_flags(p)
    p.add_argument("--out", required=True, help=".npz file; an interrupted run resumes from the chunks beside it")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("transfer", help="linear SVM on transfer features: mean class recall (Caltech protocol) or "
                       "mAP (VOC protocol), report shaped like the paper's Table 11")
    p.add_argument("--features-train", metavar="FILE", help="features of the training images (`vgg-keras "
                   "features`); with --model: where to write them")
    p.add_argument("--features-val", metavar="FILE", help="features of the test images; with --model: where to "
                   "write them")
    p.add_argument("--model", action="append", metavar="RUN_OR_FILE", help="extract the features first, with this "
                   "model (repeat to stack)")
    p.add_argument("--data", help="with --model: the data set to transfer to")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--manual-dir", help="TFDS manual directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation split when the data has no val/")
    _add_feature_flags(p)
    c = p.add_mutually_exclusive_group()
    c.add_argument("--c", type=float, help="the SVM's C (default: chosen on a held-out 20 %% of the training set)")
    c.add_argument("--c-search", action="store_true", help="choose C on a held-out 20 %% (the default)")
    p.add_argument("--splits", type=int, help="Caltech protocol: N random splits of the train+val images ...")
    p.add_argument("--train-per-class", type=int, help="... with K training images per class (Caltech-101: 30)")
    p.add_argument("--test-per-class", type=int, help="... and up to M test images per class (default: the rest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the C hold-out and the SVM")
    p.add_argument("--out", help="report as JSON (e.g. transfer.json); its markdown and PNG go beside it")
    p.set_defaults(func=cmd_transfer)

    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ConnectionError) as err:
        print(f"vgg-keras {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
