"""``lageo data audit|split|sample|import``: leakage audit, splits, area-normalised sampling, your own photos."""

from __future__ import annotations

import json
from pathlib import Path

from lageo_utils.cli import CommandError, print_json


def register(subparsers) -> None:
    group = subparsers.add_parser("data", help="manifests, splits and the leakage audit").add_subparsers(
        dest="action", required=True
    )
    audit = group.add_parser("audit", help="count test images that leak coordinates from training")
    audit.add_argument("--train", required=True, help="training manifest (CSV/Parquet, canonical or authors')")
    audit.add_argument("--test", required=True, help="test manifest")
    audit.set_defaults(func=_audit)

    sp = group.add_parser("split", help="write train/val/test CSVs and audit.json")
    sp.add_argument("manifest", help="canonical manifest or authors' metadata (CSV/Parquet)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--strategy", choices=["location", "image"], default="location")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--buffer-m", type=float, default=0.0, help="exclude val/test points this close to training")
    sp.add_argument("--fractions", type=float, nargs=3, default=(0.70, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    _add_manifest_options(sp)
    sp.set_defaults(func=_split)

    sample = group.add_parser("sample", help="area-normalised sample of a manifest (the authors' scheme)")
    sample.add_argument("manifest")
    sample.add_argument("--out", required=True, help="output manifest (CSV/Parquet)")
    sample.add_argument("--seed", type=int, default=42)
    _add_manifest_options(sample)
    sample.set_defaults(func=_sample)

    from lageo_utils.cli.collect import add_import_arguments

    imp = group.add_parser("import", help="manifest from your own geotagged photos (EXIF GPS) or a CSV of paths")
    add_import_arguments(imp)
    imp.set_defaults(func=_import)


def _add_manifest_options(parser) -> None:
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--outside", choices=["keep", "drop", "fail"], default="keep",
                        help="labelled rows outside their region box")
    parser.add_argument("--unlabeled", choices=["drop", "fail"], default="drop",
                        help="unlabelled rows outside every region box")
    parser.add_argument("--dedupe", action="store_true",
                        help="keep the first of repeated image paths (default: refuse the manifest)")


def _load(args, path):
    from lageo_utils.data import ManifestError, read_manifest
    from lageo_utils.regions import RegionsError, load_regions

    try:
        regions = load_regions(getattr(args, "regions", None))
        manifest, report = read_manifest(
            path, regions, outside=getattr(args, "outside", "keep"), unlabeled=getattr(args, "unlabeled", "drop"),
            dedupe=getattr(args, "dedupe", False),
        )
    except (ManifestError, RegionsError) as exc:
        raise CommandError(str(exc)) from None
    return regions, manifest, report


def _audit(args) -> int:
    from lageo_utils.splits import audit_leakage

    _, train, _ = _load(args, args.train)
    _, test, _ = _load(args, args.test)
    print_json(audit_leakage(train, test))
    return 0


def _split(args) -> int:
    from lageo_utils.data import write_manifest
    from lageo_utils.splits import audit_leakage, split

    _, manifest, report = _load(args, args.manifest)
    try:
        parts = split(manifest, args.strategy, tuple(args.fractions), args.seed, args.buffer_m)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        if name != "excluded" or len(part):
            write_manifest(part, out / f"{name}.csv")
    audit = audit_leakage(parts["train"], parts["test"])
    summary = {**audit, "strategy": args.strategy, "seed": args.seed, "buffer_m": args.buffer_m,
               "counts": {k: len(v) for k, v in parts.items()}, "manifest_warnings": report.messages()}
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    print_json(summary)
    return 0


def _sample(args) -> int:
    from lageo_utils.data import write_manifest
    from lageo_utils.sampling import area_normalized_sample, sampling_summary

    regions, manifest, _ = _load(args, args.manifest)
    sample = area_normalized_sample(manifest, regions, seed=args.seed)
    write_manifest(sample, args.out)
    print_json(sampling_summary(manifest, regions).reset_index().to_dict(orient="records"))
    return 0


def _import(args) -> int:
    from lageo_utils.cli.collect import run_import

    return run_import(args)
