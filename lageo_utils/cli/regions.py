"""``lageo regions check PATH``."""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json


def register(subparsers) -> None:
    group = subparsers.add_parser("regions", help="region definitions").add_subparsers(dest="action", required=True)
    check = group.add_parser("check", help="validate a region file and print a JSON summary")
    check.add_argument("path", help="GeoJSON or the authors' JSON region file")
    check.set_defaults(func=_check)


def _check(args) -> int:
    from lageo_utils.regions import RegionsError, load_regions, regions_summary

    try:
        regions = load_regions(args.path)
    except RegionsError as exc:
        raise CommandError(str(exc)) from None
    print_json(regions_summary(regions))
    return 0
