"""``lageo collect streetview|mapillary`` (downloaders) and the ``lageo data import`` arguments (your own photos).

Keys come only from the environment (``GOOGLE_MAPS_API_KEY``, ``MAPILLARY_ACCESS_TOKEN``), never
from the command line, so they stay out of shell history, process lists and logs.
"""

from __future__ import annotations

import os
import sys

from lageo_utils.cli import CommandError, print_json

INTERRUPTED_EXIT = 130


def register(subparsers) -> None:
    group = subparsers.add_parser(
        "collect", help="download street-level images (Google Street View, Mapillary) into a data folder"
    ).add_subparsers(dest="action", required=True)

    sv = group.add_parser(
        "streetview",
        help="Google Street View Static API: metadata, then one image per heading (key: GOOGLE_MAPS_API_KEY)",
        description="Images may not be redistributed (Google Maps Platform terms); see docs/data-collection.md.",
    )
    _common(sv, default_base="https://maps.googleapis.com")
    sv.add_argument("--points-per-region", type=int, required=True, help="capture points per region box")
    sv.add_argument("--method", choices=["grid", "random"], default="grid", help="capture point layout")
    sv.add_argument("--headings", default="0,90,180,270", help="compass headings per point (degrees, comma-separated)")
    sv.add_argument("--size", default="640x640", help="image size WIDTHxHEIGHT (at most 640x640)")
    sv.add_argument("--fov", type=float, default=90.0, help="horizontal field of view in degrees")
    sv.add_argument("--pitch", type=float, default=0.0, help="camera pitch in degrees")
    sv.add_argument("--radius-m", type=float, default=50.0, help="metadata search radius around each point")
    sv.add_argument("--outdoor", action="store_true", help="outdoor panoramas only (source=outdoor)")
    sv.set_defaults(func=_streetview)

    mly = group.add_parser(
        "mapillary",
        help="Mapillary API v4: CC BY-SA images inside each box (token: MAPILLARY_ACCESS_TOKEN)",
        description="Mapillary images are CC BY-SA 4.0: a dataset built from them may be shared with attribution.",
    )
    _common(mly, default_base="https://graph.mapillary.com")
    mly.add_argument("--images-per-region", type=int, required=True, help="images per region box")
    mly.add_argument("--thumb-size", choices=["256", "1024", "2048", "original"], default="1024",
                     help="thumbnail width in pixels to download")
    mly.add_argument("--include-pano", action="store_true", help="also take 360-degree panoramas")
    mly.add_argument("--tile-deg", type=float, default=0.05, help="search tile side in degrees (API bbox limit)")
    mly.set_defaults(func=_mapillary)


def _common(parser, default_base: str) -> None:
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--region-ids", default=None, help="only these regions (comma-separated ids)")
    parser.add_argument("--out", required=True, help="data folder: images/ and manifest.csv go here")
    parser.add_argument("--min-distance-m", type=float, default=10.0, help="minimum distance between points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--max-images", type=int, default=None, help="budget: image requests in this run")
    parser.add_argument("--max-retries", type=int, default=5, help="retries on 429, 5xx and dropped connections")
    parser.add_argument("--backoff-s", type=float, default=1.0, help="first retry wait (doubles each retry)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned requests; no image request")
    parser.add_argument("--base-url", default=default_base, help=f"API scheme and host (default {default_base})")


def _regions(args):
    from lageo_utils.regions import RegionsError, load_regions

    try:
        regions = load_regions(args.regions)
    except RegionsError as exc:
        raise CommandError(str(exc)) from None
    if args.region_ids:
        wanted = [r.strip() for r in args.region_ids.split(",") if r.strip()]
        unknown = sorted(set(wanted) - set(regions["id"]))
        if unknown:
            raise CommandError(f"--region-ids: {unknown} are not in the region file (ids: {regions['id'].tolist()})")
        regions = regions[regions["id"].isin(wanted)].reset_index(drop=True)
    return regions


def _retry(args):
    from lageo_utils.collect.http import RetryPolicy

    if args.max_retries < 0 or args.backoff_s < 0:
        raise CommandError("--max-retries and --backoff-s must be >= 0")
    return RetryPolicy(max_retries=args.max_retries, backoff_s=args.backoff_s)


def _run(collect) -> int:
    """Run a collector: user-fixable failures become ``CommandError``, Ctrl-C says how to resume."""
    from lageo_utils.collect.http import CollectError

    try:
        print_json(collect())
    except (CollectError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        print("interrupted: everything downloaded so far is kept; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0


def _streetview(args) -> int:
    from lageo_utils.collect import StreetViewOptions, collect_streetview, sample_points
    from lageo_utils.collect.streetview import KEY_ENV, headings_from_text

    key = os.environ.get(KEY_ENV) or None
    if not key and not args.dry_run:
        raise CommandError(f"set {KEY_ENV} in the environment (keys are never taken from the command line)")
    regions = _regions(args)
    try:
        options = StreetViewOptions(headings=headings_from_text(args.headings), size=args.size, fov=args.fov,
                                    pitch=args.pitch, radius_m=args.radius_m, outdoor=args.outdoor)
        points = sample_points(regions, args.points_per_region, args.method, args.min_distance_m, args.seed)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return _run(lambda: collect_streetview(
        points, args.out, key, options=options, rate=args.rate, max_images=args.max_images, dry_run=args.dry_run,
        base_url=args.base_url, retry=_retry(args),
    ))


def _mapillary(args) -> int:
    from lageo_utils.collect import collect_mapillary
    from lageo_utils.collect.mapillary import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV) or None
    if not token and not args.dry_run:
        raise CommandError(f"set {TOKEN_ENV} in the environment (tokens are never taken from the command line)")
    regions = _regions(args)
    return _run(lambda: collect_mapillary(
        regions, args.out, token, per_region=args.images_per_region, thumb_size=args.thumb_size,
        min_distance_m=args.min_distance_m, include_pano=args.include_pano, seed=args.seed, rate=args.rate,
        max_images=args.max_images, dry_run=args.dry_run, base_url=args.base_url, retry=_retry(args),
        tile_deg=args.tile_deg,
    ))


def add_import_arguments(parser) -> None:
    """Arguments of ``lageo data import``."""
    parser.add_argument("source", help="a folder of geotagged JPEG/PNG photos, or a CSV with path and coordinates")
    parser.add_argument("--out", required=True, help="data folder for manifest.csv (image paths are relative to it)")
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--copy", action="store_true", help="copy the images into OUT/images/")
    parser.add_argument("--no-recursive", dest="recursive", action="store_false", help="skip subfolders")


def run_import(args) -> int:
    """``lageo data import``: print the report; exit 2 when no image could be used."""
    from lageo_utils.collect import import_images
    from lageo_utils.data import ManifestError
    from lageo_utils.regions import RegionsError, load_regions

    try:
        _, report = import_images(args.source, args.out, load_regions(args.regions), copy=args.copy,
                                  recursive=args.recursive)
    except (ManifestError, RegionsError) as exc:
        raise CommandError(str(exc)) from None
    print_json(report)
    if not report["imported"]:
        raise CommandError(f"no image could be imported from {args.source} (reasons: {report['skipped_by_reason']})")
    return 0
