"""The README's reference tables, generated from the contract, the settings and the demo plan.

    python -m pg2cio_assets.docs          # rewrite the generated blocks of README.md
    python -m pg2cio_assets.docs --check  # exit 1 if README.md is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from pg2cio_assets import contract, customerio, identity, settings
from pg2cio_assets.extract import state_table_name
from pg2cio_assets.seed import EdgeCasePlan

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def relations_table() -> str:
    rows = ["| relation | one row per | daily partition by | key | extract table (state schema) |", "| --- | --- | --- | --- | --- |"]
    for rel in contract.SOURCE_RELATIONS:
        placed = f"`{rel.parent.relation}.{rel.partition_column}`" if rel.parent else f"`{rel.partition_column}`"
        key = ", ".join(rel.primary_key) or "(append-only log)"
        rows.append(f"| `{rel.name}` | {rel.doc} | {placed} | {key} | `{state_table_name(rel)}` |")
    return "\n".join(rows) + "\n"


def columns_table() -> str:
    rows = ["| relation | column | type | required | checked |", "| --- | --- | --- | --- | --- |"]
    for rel in contract.SOURCE_RELATIONS:
        for c in rel.columns:
            checks = []
            if c.isin:
                checks.append("one of " + ", ".join(c.isin))
            if c.ge is not None:
                checks.append(f">= {c.ge:g}")
            if c.pattern:
                checks.append(f"matches `{c.pattern}`")
            if (c.name,) == rel.primary_key or c.name in rel.primary_key:
                checks.append("unique key" if len(rel.primary_key) == 1 else "part of the key")
            rows.append(
                f"| `{rel.name}` | `{c.name}` | {c.pg_type} | {'yes' if not c.nullable else ''} | {'; '.join(checks)} |"
            )
    return "\n".join(rows) + "\n"


def config_table() -> str:
    rows = ["| variable | meaning | default |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {meaning} | {default} |" for name, meaning, default in settings.VARIABLES]
    return "\n".join(rows) + "\n"


def edge_cases_table() -> str:
    small, large = EdgeCasePlan.for_customers(2000), EdgeCasePlan.for_customers(100_000)
    rows = ["| case | what it is | demo (2,000) | benchmark (100,000) |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(EdgeCasePlan):
        if "doc" in f.metadata:
            rows.append(f"| `{f.name}` | {f.metadata['doc']} | {getattr(small, f.name):,} | {getattr(large, f.name):,} |")
    return "\n".join(rows) + "\n"


def identity_rules() -> str:
    """The rules as the identity module states them (its docstring's bullet list)."""
    doc = identity.__doc__ or ""
    bullets, current = [], None
    for line in doc.splitlines():
        if line.startswith("- "):
            current = line[2:].strip()
            bullets.append(current)
        elif line.startswith("  ") and bullets and line.strip():
            bullets[-1] += " " + line.strip()
    return "".join(f"- {b}\n" for b in bullets)


def attributes_table() -> str:
    rows = ["| attribute | Customer.io type | meaning | from | use case | may be absent |", "| --- | --- | --- | --- | --- | --- |"]
    for a in contract.PERSON_ATTRIBUTES:
        rows.append(f"| `{a.name}` | {contract.ATTRIBUTE_KINDS[a.kind].customerio} | {a.doc} | {a.source} | {a.use_case} | {'yes' if a.nullable else ''} |")
    return "\n".join(rows) + "\n"


def taxonomy_table() -> str:
    rows = ["| event | what happened | timestamp from | properties | items | use case (latency) | on by default |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in contract.EVENTS:
        props = ", ".join(f"`{p.name}` {p.kind}{'?' if p.nullable else ''}" for p in e.properties)
        u = contract.USE_CASES[e.use_case]
        latency = f"{u.latency_minutes} min" if u.latency_minutes < 120 else f"{u.latency_minutes // 60} h"
        rows.append(f"| `{e.name}` | {e.doc} | `{e.relation}.{e.timestamp_column}` | {props} | "
                    f"{'yes' if e.items else ''} | {e.use_case} ({latency}) | {'yes' if e.enabled_by_default else 'no'} |")
    return "\n".join(rows) + "\n"


def limits_table() -> str:
    rows = ["| Customer.io limit | pg2cio checks |", "| --- | --- |"]
    rows += [f"| {what} | {limit} |" for what, limit in customerio.LIMITS]
    return "\n".join(rows) + "\n"


def _minutes(m: int) -> str:
    return f"{m} min" if m < 120 else f"{m // 60} h"


def use_cases_table() -> str:
    """Each use case, its target, and where Dagster enforces it (derived, as the code derives it)."""
    from pg2cio_assets.events import enabled_events

    serving = contract.asset_use_cases(enabled_events())
    event_use_cases = {e.use_case for e in enabled_events()}
    rows = ["| use case | what it drives | latency target | freshness policy (fail window) on | delivery check |",
            "| --- | --- | --- | --- | --- |"]
    for u in contract.USE_CASES.values():
        assets = [f"`{a}` ({_minutes(contract.latency_target_minutes(ucs))})" for a, ucs in serving.items() if u.name in ucs]
        check = f"`delivery_report: {u.name}_delivery_within_target`" if u.name in event_use_cases else "(attributes only)"
        rows.append(f"| {u.name} | {u.doc} | {_minutes(u.latency_minutes)} | {', '.join(assets)} | {check} |")
    return "\n".join(rows) + "\n"


BLOCKS = {
    "relations": relations_table,
    "columns": columns_table,
    "config": config_table,
    "edge_cases": edge_cases_table,
    "identity_rules": identity_rules,
    "attributes": attributes_table,
    "use_cases": use_cases_table,
    "taxonomy": taxonomy_table,
    "limits": limits_table,
}


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no generator; known: {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return _BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("path", nargs="?", type=Path, default=README)
    args = parser.parse_args(argv)
    current = args.path.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{args.path} is stale: run `python -m pg2cio_assets.docs`", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
