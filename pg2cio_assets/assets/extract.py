"""Source extract assets: one per contract relation, daily-partitioned, replacing their window.

Each asset is thin: it resolves the run's time window (a single day or a whole backfill range
in one run) and hands it to `pg2cio_assets.extract.extract_window`.
"""


import dagster as dg
from dagster import AssetExecutionContext

from pg2cio_assets import contract
from pg2cio_assets.extract import extract_window, state_table_name
from pg2cio_assets.partitions import run_window
from pg2cio_assets.resources import PostgresResource

WINDOW_CHECK = "window_matches_source"


def source_key(rel: contract.Relation) -> dg.AssetKey:
    return dg.AssetKey(["commerce", rel.name])


def column_schema(rel: contract.Relation) -> dg.TableSchema:
    cols = [
        dg.TableColumn(
            name=c.name,
            type=contract.SOURCE_KINDS[c.kind].state_type,
            description=c.doc or None,
            constraints=dg.TableColumnConstraints(nullable=c.nullable, unique=rel.primary_key == (c.name,)),
        )
        for c in rel.columns
    ]
    cols += [
        dg.TableColumn("_partition_at", "timestamptz", "the timestamp that placed the row in its partition"),
        dg.TableColumn("_extracted_at", "timestamptz", "when pg2cio read the row"),
        dg.TableColumn("_run_id", "text", "the Dagster run that wrote the row"),
    ]
    return dg.TableSchema(columns=cols)


def source_specs() -> list[dg.AssetSpec]:
    """The store's contract relations, shown upstream of the extracts (pg2cio never writes them)."""
    return [
        dg.AssetSpec(key=source_key(r), group_name="source", kinds={"postgres"}, description=r.doc)
        for r in contract.SOURCE_RELATIONS
    ]


def _describe(rel: contract.Relation, state_schema: str) -> str:
    placed = (
        f"its {rel.parent.relation}' `{rel.partition_column}` (lines travel with their {rel.parent.relation[:-1]})"
        if rel.parent
        else f"`{rel.partition_column}`"
    )
    return (
        f"{rel.doc}\n\nRows of the store's `{rel.name}`, placed in daily partitions by {placed} (the first "
        "partition also holds everything older), "
        f"validated against the contract and kept in `{state_schema}.{state_table_name(rel)}`. "
        "Rematerializing a partition replaces it; a row that changed since replaces its older copy."
    )


def build_extract_asset(
    rel: contract.Relation, partitions: dg.PartitionsDefinition, state_schema: str
) -> dg.AssetsDefinition:
    name = state_table_name(rel)
    deps = [source_key(rel)] + ([source_key(contract.relation(rel.parent.relation))] if rel.parent else [])

    @dg.asset(
        name=name,
        group_name="extract",
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"postgres", "pandas"},
        deps=deps,
        description=_describe(rel, state_schema),
        metadata={
            "dagster/column_schema": column_schema(rel),
            "dagster/table_name": f"{state_schema}.{name}",
        },
        check_specs=[
            dg.AssetCheckSpec(
                WINDOW_CHECK,
                asset=name,
                blocking=True,
                description="After the write, the extract table holds exactly as many rows in the window as a SQL "
                "count of the same window finds in the source snapshot.",
            )
        ],
    )
    def _extract(context: AssetExecutionContext, source: PostgresResource, state: PostgresResource) -> dg.MaterializeResult:
        start, end = run_window(context, partitions)
        context.log.info(f"extracting {rel.name} for [{start.isoformat()}, {end.isoformat()})")
        with source.connect() as src, state.connect() as dst:
            res = extract_window(
                src,
                dst,
                rel,
                source_schema=source.schema_name,
                state_schema=state.schema_name,
                start=start,
                end=end,
                run_id=context.run.run_id,
                log=context.log.info,
            )
        context.log.info(
            f"{rel.name}: {res.rows_read:,} rows written, {res.rows_replaced:,} older copies replaced, "
            f"{res.table_rows:,} rows in {res.table} ({res.seconds:.1f}s)"
        )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": res.table_rows,
                "dagster/column_schema": column_schema(rel),
                "rows_in_window": res.rows_read,
                "rows_replaced": res.rows_replaced,
                "window_start": res.window_start.isoformat(),
                "window_end": res.window_end.isoformat(),
                "seconds": round(res.seconds, 2),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=WINDOW_CHECK,
                    passed=res.window_rows == res.source_count,
                    metadata={"rows_in_extract_window": res.window_rows, "rows_in_source_window": res.source_count},
                )
            ],
        )

    return _extract


def build_extract_assets(partitions: dg.PartitionsDefinition, state_schema: str) -> list[dg.AssetsDefinition]:
    return [build_extract_asset(r, partitions, state_schema) for r in contract.SOURCE_RELATIONS]
