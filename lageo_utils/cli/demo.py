"""``lageo demo build``: write the synthetic demo images and their manifest."""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json


def register(subparsers) -> None:
    group = subparsers.add_parser("demo", help="the embedded synthetic demo dataset").add_subparsers(
        dest="action", required=True
    )
    build = group.add_parser("build", help="draw street-scene-like images at capture points and write manifest.csv")
    build.add_argument("--out", required=True, help="output folder (images/ and manifest.csv)")
    build.add_argument("--points-per-region", type=int, default=40, help="capture points per region (4 images each)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--size", type=int, default=224, help="image width and height in pixels")
    build.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    build.add_argument("--force", action="store_true", help="overwrite an existing demo in --out")
    build.set_defaults(func=_build)


def _build(args) -> int:
    from lageo_utils.demo import build_demo
    from lageo_utils.regions import load_regions

    try:
        regions = load_regions(args.regions)
        manifest = build_demo(args.out, points_per_region=args.points_per_region, seed=args.seed,
                              image_size=args.size, regions=regions, overwrite=args.force)
    except FileExistsError as exc:
        raise CommandError(f"{exc} (use --force)") from None
    except ValueError as exc:  # RegionsError, bad sizes or counts, a manifest problem
        raise CommandError(str(exc)) from None
    print_json({
        "out": args.out,
        "manifest": f"{args.out}/manifest.csv",
        "images": len(manifest),
        "regions": manifest["region_id"].nunique(),
        "points": manifest["location_id"].nunique(),
        "seed": args.seed,
        "size": args.size,
    })
    return 0
