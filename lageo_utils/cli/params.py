"""``lageo params``: every run parameter with its type, default, each profile's value and help."""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("params", help="the run parameters: type, default, profile values, help")
    parser.add_argument("--profile", default=None, help="show only this profile's values (default: every profile)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="a Markdown table (the README's parameter section)")
    parser.set_defaults(func=_params)


def parameter_table(profiles: list[str]) -> list[dict]:
    """One row per parameter: name, group, allowed values, default, each profile's value, help."""
    from lageo_utils.params import PARAMS
    from lageo_utils.runs import resolve_params

    values = {name: resolve_params(name) for name in profiles}
    return [{"name": p.name, "group": p.group, "allowed": p.allowed(), "default": p.default,
             **{name: values[name][p.name] for name in profiles}, "help": p.help} for p in PARAMS.values()]


def markdown_table(rows: list[dict], profiles: list[str]) -> str:
    header = ["parameter", "allowed", "default", *profiles, "meaning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['name']}`", row["allowed"], _show(row["default"]), *(_show(row[p]) for p in profiles),
                 row["help"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(_show, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _params(args) -> int:
    from lageo_utils.runs import RunError, profile_names

    profiles = [args.profile] if args.profile else profile_names()
    try:
        rows = parameter_table(profiles)
    except RunError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json(rows)
    elif args.markdown:
        print(markdown_table(rows, profiles))
    else:
        widths = {k: max(len(k), *(len(_show(r[k])) for r in rows)) for k in ("name", "allowed", "default", *profiles)}
        columns = list(widths)
        print("  ".join(c.ljust(widths[c]) for c in columns) + "  help")
        for row in rows:
            print("  ".join(_show(row[c]).ljust(widths[c]) for c in columns) + "  " + row["help"])
    return 0
