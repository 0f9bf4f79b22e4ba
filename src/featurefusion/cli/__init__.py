"""The `featurefusion` command. Every sub-command is a thin call into the library.

One module per group of sub-commands; each has `register(subparsers)`, and every sub-parser names its handler
with `set_defaults(handler=...)`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from featurefusion import __version__
from featurefusion.cli import distilling, evaluation, merging, toyworld, training
from featurefusion.errors import FeatureFusionError

GROUPS = (merging, toyworld, evaluation, training, distilling)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurefusion", description="Merge diffusion models: FeatureFusion, Diffusion Soup, ..."
    )
    parser.add_argument("--version", action="version", version=f"featurefusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.handler(args) or 0
    except FeatureFusionError as err:
        if args.verbose:
            raise
        print(f"featurefusion: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featurefusion: interrupted; no output was written", file=sys.stderr)
        return 130
