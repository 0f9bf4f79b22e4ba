"""Sub-commands that make specialists for real Stable Diffusion: `shard` (keyword-scored data shards) and
`finetune` (UNet-only fine-tuning on one shard). Both are thin calls into `featurefusion.train`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    _register_shard(sub)
    _register_finetune(sub)


def _register_shard(sub) -> None:
    p = sub.add_parser(
        "shard",
        help="keyword-scored specialist shards (top k per category, train/test) from a captioned image dataset",
    )
    p.set_defaults(handler=cmd_shard)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="local folder of images with metadata.jsonl/.csv or .txt captions")
    source.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset name, e.g. yuvalkirstain/pickapic_v1")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to create (manifest.json + shards)")
    p.add_argument("--categories", type=Path, help="YAML/JSON: category -> keywords (default: the paper's seven)")
    p.add_argument("--split", default="train", help="dataset split to read (--dataset only; default train)")
    p.add_argument("--revision", help="dataset revision (--dataset only)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    p.add_argument("--caption-column", help="caption column (default: caption; for folders caption, then text)")
    p.add_argument(
        "--image-column",
        action="append",
        help="image column, repeatable (--dataset only; default Pick-a-Pic's jpg_0 and jpg_1)",
    )
    p.add_argument(
        "--label-column",
        action="append",
        help="preference label per image column: the higher-labelled image is taken (default label_0 label_1 "
        "with the default image columns, none otherwise)",
    )
    p.add_argument("-k", "--top-k", type=int, default=1000, help="images per category, train+test (default 1000)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of each category for test (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--min-score", type=int, default=1, help="distinct keyword hits a caption needs (default 1)")
    p.add_argument(
        "--overlap",
        choices=("best", "all"),
        default="best",
        help="best: a caption competes only in its best category (default); all: in every category it matches",
    )
    p.add_argument("--keep-duplicate-captions", action="store_true", help="do not drop repeated prompts")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--limit", type=int, help="scan only the first N rows (to try things out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _register_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune the UNet of a Stable Diffusion pipeline on a captioned folder")
    p.set_defaults(handler=cmd_finetune)
    p.add_argument(
        "--model", required=True, help="diffusers pipeline folder or hub id, e.g. CompVis/stable-diffusion-v1-4"
    )
    p.add_argument("--data", type=Path, required=True, help="captioned image folder, e.g. SHARDS/food/train")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the fine-tuned diffusers UNet")
    p.add_argument("--revision", help="model revision (hub ids)")
    p.add_argument("--caption-column", help="caption column of the data's metadata (default: caption, then text)")
    p.add_argument("--resolution", type=int, default=512, help="training image size (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="images per device and micro-batch (default 1)")
    p.add_argument("--gradient-accumulation", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default 1e-6)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 = off (default 1.0)")
    p.add_argument("--lr-scheduler", default="cosine", help="diffusers scheduler name (default cosine)")
    p.add_argument("--warmup-steps", type=int, default=100, help="learning-rate warmup steps (default 100)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule ends there too)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="default no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--attention-slicing", default="auto", help="off, auto (default), max or a slice size")
    p.add_argument("--no-vae-slicing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500, help="save the training state every N steps; 0 = never")
    p.add_argument("--checkpoint-dir", type=Path, help="where states go (default: OUTPUT-checkpoints)")
    p.add_argument("--resume", help="'latest' (in the checkpoint dir) or a saved state folder")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_shard(args: argparse.Namespace) -> None:
    from featurefusion.train.shard import ShardOptions, build_shards, shard_folder
    from featurefusion.train.sources import load_hub_source

    options = ShardOptions(
        k=args.top_k,
        test_fraction=args.test_fraction,
        seed=args.seed,
        min_score=args.min_score,
        overlap=args.overlap,
        dedupe_captions=not args.keep_duplicate_captions,
        on_bad_image="skip" if args.skip_bad_images else "error",
        limit=args.limit,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    if args.folder is not None:
        result = shard_folder(args.folder, args.output, args.categories, args.caption_column, options)
    else:
        source = load_hub_source(
            args.dataset,
            split=args.split,
            streaming=args.streaming,
            revision=args.revision,
            caption_column=args.caption_column or "caption",
            image_columns=args.image_column,
            label_columns=args.label_column,
        )
        result = build_shards(source, args.output, args.categories, options)
    for category, count in result.counts.items():
        print(f"{category}: {count['train']} train, {count['test']} test ({count['candidates']} candidates)")
    print(f"wrote {result.output} (manifest: {result.manifest}) from {result.rows_scanned} rows")


def cmd_finetune(args: argparse.Namespace) -> None:
    from featurefusion.train.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        revision=args.revision,
        caption_column=args.caption_column,
        resolution=args.resolution,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        learning_rate=args.lr,
        adam_weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        epochs=args.epochs,
        max_steps=args.max_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        attention_slicing=args.attention_slicing,
        vae_slicing=not args.no_vae_slicing,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    result = finetune(config)
    loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained steps {result.start_step}..{result.start_step + result.steps_run} of {result.total_steps}{loss}")
    print(f"wrote {result.output} (diffusers UNet; states in {config.state_dir})")
