"""The code location as Dagster loads it, the instance dagster.yaml describes, and the README's tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg

from pg2cio_assets import contract, docs
from pg2cio_assets.assets.extract import WINDOW_CHECK
from pg2cio_assets.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


def test_every_contract_relation_has_a_daily_single_run_extract_with_a_blocking_check():
    graph = defs.resolve_asset_graph()
    for rel in contract.SOURCE_RELATIONS:
        node = graph.get(dg.AssetKey(f"{rel.name}_extract"))
        assert isinstance(node.partitions_def, dg.DailyPartitionsDefinition)
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
        assert node.group_name == "extract"
        assert dg.AssetKey(["commerce", rel.name]) in node.parent_keys
    blocking = _check_specs()
    assert all(blocking[(f"{r.name}_extract", WINDOW_CHECK)] for r in contract.SOURCE_RELATIONS)


def _check_specs() -> dict[tuple[str, str], bool]:
    """(asset, check) -> blocking, for every check the code location declares."""
    return {
        (c.asset_key.to_user_string(), c.name): c.blocking
        for a in defs.resolve_asset_graph().assets_defs
        for c in a.check_specs
    }


def test_identity_attributes_and_events_stand_downstream_of_the_extracts_with_blocking_checks():
    graph = defs.resolve_asset_graph()
    for key, group in (("identity_map", "identity"), ("people", "identity"), ("identity_merges", "identity"),
                       ("person_attributes", "attributes")):
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group and node.partitions_def is None
    assert dg.AssetKey("customers_extract") in graph.get(dg.AssetKey("people")).parent_keys
    assert dg.AssetKey("people") in graph.get(dg.AssetKey("person_attributes")).parent_keys
    events = graph.get(dg.AssetKey("events"))
    assert isinstance(events.partitions_def, dg.DailyPartitionsDefinition)
    assert events.backfill_policy == dg.BackfillPolicy.single_run()
    assert {dg.AssetKey("people"), dg.AssetKey("orders_extract")} <= events.parent_keys
    checks = _check_specs()
    expected = {("events", n) for n in ("ids_unique_and_valid_ulids", "names_in_contract",
                                        "timestamps_inside_partition_window", "properties_have_contract_types")}
    expected |= {("people", "one_person_per_customer_id"), ("people", "no_email_on_two_people_unless_flagged"),
                 ("person_attributes", "attributes_have_contract_types"), ("person_attributes", "no_negative_counts")}
    assert all(checks[key] for key in expected), "every check must be declared and blocking"


def test_both_syncs_share_the_customerio_pool():
    graph = defs.resolve_asset_graph()
    for key in ("customerio_people_sync", "customerio_events_sync"):
        assert graph.get(dg.AssetKey(key)).assets_def.node_def.pools == {"customerio"}, key


def test_dagster_validates_the_workspace_on_the_postgres_instance(dagster_database):
    # Dagster reads ./dagster.yaml when DAGSTER_HOME is unset: the Postgres-backed instance.
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "PG2CIO_DAGSTER_URL": dagster_database},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful for code location pg2cio" in out.stdout + out.stderr


def test_readme_tables_are_generated_from_the_contract():
    readme = (ROOT / "README.md").read_text()
    assert docs.render(readme) == readme, "README.md is stale: run `python -m pg2cio_assets.docs`"
    for rel in contract.SOURCE_RELATIONS:
        assert f"| `{rel.name}` |" in readme


def test_runs_are_recorded_in_the_postgres_instance_of_dagster_yaml(seeded, dagster_database, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("PG2CIO_DAGSTER_URL", dagster_database)
    from pg2cio_assets.assets.extract import build_extract_assets
    from pg2cio_assets.partitions import daily_partitions
    from pg2cio_assets.resources import PostgresResource

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        # Runs are queued, one sensor run at a time, and the customerio pool has one slot.
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        limits = {(t["key"], t.get("value")): t["limit"] for t in concurrency.run_queue_config.tag_concurrency_limits}
        assert limits[("dagster/sensor_name", "source_changes_sensor")] == 1
        result = dg.materialize(
            build_extract_assets(daily_partitions("2024-01-01"), seeded.state_schema),
            instance=instance,
            partition_key="2026-11-20",
            selection=["orders_extract"],
            resources={
                "source": PostgresResource(url=seeded.url, schema_name=seeded.source_schema),
                "state": PostgresResource(role="state", url=seeded.url, schema_name=seeded.state_schema),
            },
        )
        assert result.success
    with psycopg.connect(dagster_database) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,)).fetchone()
        kinds = {r[0] for r in conn.execute("SELECT DISTINCT dagster_event_type FROM event_logs WHERE run_id = %s", (result.run_id,))}
    assert status == ("SUCCESS",)
    assert {"ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION"} <= kinds
