"""``lageo train``: fine-tune CLIP on DIR/train.csv, validate on DIR/val.csv, keep the best checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from lageo_utils.cli import CommandError, print_json
from lageo_utils.params import ENGINES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune CLIP on a split directory (best.pt, last.pt, history.csv, train_summary.json)",
        description="Train on SPLITS/train.csv, validate after every epoch on SPLITS/val.csv and write "
        "best.pt, last.pt, history.csv and train_summary.json into --out. On several processes or GPUs: "
        "torchrun --nproc_per_node N -m lageo_utils.cli train ... (--batch-size is the global batch).",
    )
    parser.add_argument("--splits", required=True, help="directory with train.csv and val.csv")
    parser.add_argument("--image-root", required=True, help="directory the manifests' image_path values are under")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (lageo-tiny for tests)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag, checkpoint PATH, or none")
    parser.add_argument("--strategy", default="linear_probe",
                        help="zeroshot | text_scale | linear_probe | partial | lora | full | contrastive "
                        "(default: linear_probe)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the strategy's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-fraction", type=float, default=0.05,
                        help="share of optimizer steps of linear warm-up before the cosine decay")
    parser.add_argument("--max-grad-norm", default="1.0", help="gradient clipping norm, or none")
    parser.add_argument("--unfreeze-blocks", type=int, default=2, help="partial: trained transformer blocks")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora: adapter rank")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="lora: adapter scaling numerator")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="lora: dropout on the adapters' input")
    parser.add_argument("--train-regions", default=None,
                        help="train and select on these regions only (comma-separated ids); evaluation keeps all")
    parser.add_argument("--augment", action="store_true", help="random resized crop and colour jitter")
    parser.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without gain")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--embed-batch-size", type=int, default=64,
                        help="images per forward pass when computing cached embeddings")
    parser.add_argument("--engine", default="eager", choices=ENGINES,
                        help="inference engine of the frozen encoder when embedding (head-only strategies)")
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/embedding_cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.set_defaults(func=_train)


def config_from_args(args):
    """The ``TrainConfig`` the arguments describe (checked against the run parameter schema)."""
    from lageo_utils.training import TrainConfig

    return TrainConfig(
        strategy=args.strategy, model_name=args.model, pretrained=args.pretrained, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum, warmup_fraction=args.warmup_fraction,
        max_grad_norm=None if args.max_grad_norm.strip().lower() == "none" else args.max_grad_norm,
        unfreeze_blocks=args.unfreeze_blocks, augment=args.augment,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        train_regions=args.train_regions.split(",") if args.train_regions else None,
        patience=args.patience, seed=args.seed, num_workers=args.num_workers, embed_batch_size=args.embed_batch_size,
        engine=args.engine,
    )


def _train(args) -> int:
    from lageo_utils.checkpoints import CheckpointError
    from lageo_utils.data import ManifestError
    from lageo_utils.model import WeightsUnavailableError
    from lageo_utils.regions import RegionsError, load_regions
    from lageo_utils.training import train

    splits = Path(args.splits)
    manifests = {name: splits / f"{name}.csv" for name in ("train", "val")}
    for name, path in manifests.items():
        if not path.is_file():
            raise CommandError(f"{path}: {name} split not found (expected train.csv and val.csv in --splits)")
    if args.resume and not (Path(args.out) / "last.pt").is_file():
        raise CommandError(f"--resume: {Path(args.out) / 'last.pt'} does not exist (nothing to resume)")
    try:
        result = train(
            manifests["train"], manifests["val"], load_regions(args.regions), args.image_root, args.out,
            config_from_args(args), device=args.device, cache_dir=args.cache_dir, resume=args.resume,
        )
    except (ValueError, ManifestError, RegionsError, CheckpointError, WeightsUnavailableError) as exc:
        raise CommandError(str(exc)) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun: process 0 prints the summary
        return 0
    keys = ("strategy", "epochs_run", "best_epoch", "best_val_acc", "zeroshot_val_acc", "stopped_early")
    print_json({**{k: result.summary[k] for k in keys}, "out": str(result.out_dir),
                "skipped_images": len(result.summary["skipped_images"])})
    return 0
