"""Arguments and printing shared by the sub-commands that write a model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="output file (or folder for --format diffusers)")
    p.add_argument(
        "--format",
        choices=("ldm", "diffusers-unet", "diffusers"),
        help="output layout (default: the base's; add/remove: as recorded)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="output float dtype (default: the base UNet's); maths is fp32",
    )
    p.add_argument(
        "--nan",
        choices=("error", "skip"),
        help="NaN/Inf in a model's weight: stop (default; add/remove: as recorded), or warn and take that module "
        "from the base",
    )
    p.add_argument(
        "--overflow",
        choices=("error", "clamp"),
        help="a merged value beyond the output dtype's range (fp16: 65504): stop (default), or saturate it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing, non-empty output folder (only one that holds a model)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--template",
        type=Path,
        help="pipeline folder whose configs/tokenizer a --format diffusers output copies (greedy soups also "
        "sample single files with it)",
    )


def output_options(args):
    from featurefusion.merge.operations import OutputOptions

    return OutputOptions(
        args.format,
        args.dtype,
        args.nan,
        False if args.no_progress else None,
        args.template,
        overwrite=args.overwrite,
        overflow=args.overflow,
    )


def print_report(report) -> None:
    print(f"wrote {report.output} ({report.format}, {report.dtype}, {report.keys} tensors) in {report.seconds:.1f} s")
