"""Configuration parsing and contract validation messages, without a database."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pg2cio_assets import contract, settings
from pg2cio_assets.schemas import ValidationError, frame_from_rows, validate_frame

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_every_contract_violation_in_a_chunk_is_reported_with_the_rows_keys():
    rel = contract.relation("subscriptions")
    rows = [
        ("sub_1", "cus_1", "SKU-1", 30, "active", T, None, T),
        ("sub_2", "cus_1", "SKU-1", 0, "deleted", T, None, T),
        ("sub_2", None, "SKU-1", 30, "active", T, None, T),
    ]
    with pytest.raises(ValidationError) as err:
        validate_frame(rel, frame_from_rows(rel, rows), "commerce.subscriptions")
    lines = str(err.value).splitlines()
    assert lines[0] == "commerce.subscriptions: rows break the contract:"
    assert any("'subscription_id' is not unique" in line and "sub_2" in line for line in lines)
    assert any("'customer_id' is NULL" in line for line in lines)
    assert any("'interval_days' must be >= 1" in line and "0" in line for line in lines)
    assert any("'status' must be one of active, canceled, paused" in line and "'deleted'" in line for line in lines)


def test_a_value_of_the_wrong_python_type_names_the_column():
    rel = contract.relation("products")
    with pytest.raises(ValidationError, match=r"column 'title' .*42"):
        validate_frame(rel, frame_from_rows(rel, [("SKU-1", 42, "coffee", 12.5, T)]), "commerce.products")


def test_an_empty_window_validates():
    for rel in contract.SOURCE_RELATIONS:
        validate_frame(rel, frame_from_rows(rel, []), rel.name)


def test_redact_url_hides_passwords_in_userinfo_and_parameters():
    assert settings.redact_url("postgresql://shop:pw@db:5432/x") == "postgresql://shop:***@db:5432/x"
    assert settings.redact_url("postgresql://db/x?user=a&password=pw") == "postgresql://db/x?user=a&password=***"
    assert settings.redact_url("postgresql://shop@db/x") == "postgresql://shop@db/x"
    assert settings.redact_url("host=db password=pw dbname=x") == "host=db password=*** dbname=x"
    assert settings.redact_url("host=db password='p w' dbname=x") == "host=db password=*** dbname=x"
    assert settings.scrub('missing "=" after "mysql://u:pw@db/x"', "mysql://u:pw@db/x") == 'missing "=" after "mysql://u:***@db/x"'


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PG2CIO_SOURCE_SCHEMA": "commerce; drop table x"}, "PG2CIO_SOURCE_SCHEMA='commerce; drop table x' is not a valid schema name"),
        ({"PG2CIO_PARTITION_START": "last year"}, "PG2CIO_PARTITION_START='last year' is not a date"),
        ({"PG2CIO_DRY_RUN": "maybe"}, "PG2CIO_DRY_RUN='maybe' is not a boolean"),
    ],
)
def test_bad_configuration_is_refused_naming_the_variable(env, message):
    with pytest.raises(settings.ConfigError) as err:
        settings.Settings.from_env(env)
    assert message in str(err.value)


def test_defaults_match_the_documented_configuration():
    cfg = settings.Settings.from_env({})
    assert (cfg.source_schema, cfg.state_schema, cfg.partition_start, cfg.dry_run) == ("commerce", "pg2cio", "2024-01-01", False)
