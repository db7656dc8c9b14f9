"""`vgg-keras` command line: each subcommand parses its flags and calls one function of the package."""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_summary(args):
    from .summary import print_summary

    print_summary(args.config, args.input_size, args.num_classes)


def build_parser():
    parser = argparse.ArgumentParser(prog="vgg-keras", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="layer table, parameter count and multiply-adds of a configuration")
    p.add_argument("--config", required=True, help="A, A-LRN, B, C, D or E")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_summary)

    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vgg-keras {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
