"""great-expectations 1.x in an ephemeral context, turned into Dagster check results.

dagster-ge needs GX < 1, so this is the bridge: one suite per table, results as AssetCheckResult.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd


@dataclass
class Expect:
    """One expectation, named after GX's class (without the 'Expect' prefix), with its kwargs."""

    kind: str
    kwargs: dict = field(default_factory=dict)


def not_null(*columns: str) -> list[Expect]:
    return [Expect("ColumnValuesToNotBeNull", {"column": c}) for c in columns]


def unique(column: str) -> Expect:
    return Expect("ColumnValuesToBeUnique", {"column": column})


def in_set(column: str, values) -> Expect:
    return Expect("ColumnValuesToBeInSet", {"column": column, "value_set": sorted(values)})


def between(column: str, low=None, high=None) -> Expect:
    return Expect("ColumnValuesToBeBetween", {"column": column, "min_value": low, "max_value": high})


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value[:10]]
    return value


def validate(df: pd.DataFrame, expectations: list[Expect], name: str) -> tuple[bool, list[dict]]:
    """Run the expectations with GX; returns (all passed, one summary dict per expectation)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch_def = (
        context.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(f"{name}_batch")
    )
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for e in expectations:
        suite.add_expectation(getattr(gxe, f"Expect{e.kind}")(**e.kwargs))
    suite = context.suites.add(suite)
    result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite)
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        rows.append(
            _clean(
                {
                    "expectation": cfg.type,
                    "column": cfg.kwargs.get("column"),
                    "success": bool(r.success),
                    "unexpected_count": (r.result or {}).get("unexpected_count"),
                    "unexpected_sample": (r.result or {}).get("partial_unexpected_list"),
                }
            )
        )
    return bool(result.success), rows


def check_result(
    df: pd.DataFrame,
    expectations: list[Expect],
    name: str,
    check_name: str,
    extra_failures: list[str] | None = None,
    asset_key: dg.AssetKey | None = None,
) -> dg.AssetCheckResult:
    """GX suite plus domain checks that GX can't express, as one blocking check result."""
    ok, rows = validate(df, expectations, name) if len(df.columns) else (False, [])
    failures = [r for r in rows if not r["success"]] if rows else [{"expectation": "table has columns", "success": False}]
    failures += [{"expectation": msg, "success": False} for msg in (extra_failures or [])]
    passed = ok and not extra_failures
    md = "\n".join(
        ["| expectation | column | passed | unexpected |", "|---|---|---|---|"]
        + [
            f"| {r['expectation']} | {r.get('column') or ''} | {'yes' if r['success'] else 'NO'} | {r.get('unexpected_sample') or ''} |"
            for r in rows + [f for f in failures if f not in rows]
        ]
    )
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=passed,
        asset_key=asset_key,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"expectations": len(rows), "failed": len(failures), "results": dg.MetadataValue.md(md)},
    )
