"""The `featurefusion` command. Every sub-command is a thin call into the library.

One module per group of sub-commands; each has `register(subparsers)`, and every sub-parser names its handler
with `set_defaults(handler=...)`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from featurefusion import __version__
from featurefusion.cli import distilling, ensemble, evaluation, merging, toyworld, training
from featurefusion.errors import FeatureFusionError

GROUPS = (merging, toyworld, evaluation, training, ensemble, distilling)


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line too (argparse prints the whole usage first); `-h` still shows it."""

    def error(self, message: str):
        self.exit(2, f"featurefusion: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featurefusion", description="Merge diffusion models: FeatureFusion, Diffusion Soup, ...")
    parser.add_argument("--version", action="version", version=f"featurefusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so both unwind through the same clean-up."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    if not args.verbose:
        # Libraries' own INFO lines (accelerate logs five per saved training state) are noise in a CLI.
        for library in ("accelerate", "diffusers", "transformers"):
            logging.getLogger(library).setLevel(logging.WARNING)
    previous = _install(signal.SIGTERM, _terminate)
    try:
        return args.handler(args) or 0
    except FeatureFusionError as err:
        if args.verbose:
            raise
        print(f"featurefusion: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, permission denied, ...: the file and the reason
        if args.verbose:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"featurefusion: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except Terminated:
        print("featurefusion: terminated; no output was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("featurefusion: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        _install(signal.SIGTERM, previous)


def _install(signum, handler):
    # Only the main thread may set handlers (tests call main() from others); there, keep the default.
    try:
        return signal.signal(signum, handler)
    except (ValueError, TypeError):
        return None
