"""`python -m dagster_project.run`: materialize every asset of the pipeline, then print the result.

The same assets `dagster dev` shows; this runs them in process against the project's Dagster
instance (.dagster/), one run for the unpartitioned stages and one per taxonomy version.
"""
import argparse
import os
import sys

from dagster_project.instance import project_instance, taxonomy_versions
from ground.settings import load_settings


def materialize_all(versions: list[str] | None = None, instance=None, resources: dict | None = None) -> list:
    """Every asset: the unpartitioned ones, each taxonomy version, then those across versions."""
    import dagster as dg

    from assets._stage import taxonomy_partitions
    from dagster_project.definitions import defs
    from dagster_project.sensors import after_partitions, split_by_partitioning

    instance = instance or project_instance()
    versions = versions or taxonomy_versions()
    instance.add_dynamic_partitions(taxonomy_partitions.name, versions)
    assets = list(defs.assets)
    resources = {**defs.resources, **(resources or {})}
    unpartitioned, partitioned = split_by_partitioning(assets)
    late = after_partitions(assets)
    # INFO, not Dagster's default DEBUG: a person reads this console.
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    results = [dg.materialize(assets, resources=resources, selection=unpartitioned, instance=instance, run_config=quiet)]
    for version in versions:
        results.append(
            dg.materialize(
                assets, resources=resources, selection=partitioned, instance=instance, partition_key=version, run_config=quiet
            )
        )
    if late:
        results.append(dg.materialize(assets, resources=resources, selection=late, instance=instance, run_config=quiet))
    return results


def summary(settings) -> str:
    """Where to look, and the checkpoints-compared table of every taxonomy version scored."""
    from resources.tracking import default_tracking_uri

    data = settings.path()
    lines = [
        f"\nDone. Outputs: {data}",
        "Browse assets, checks and lineage: DAGSTER_HOME=$PWD/.dagster .venv/bin/dagster dev   (then http://127.0.0.1:3000)",
        f"MLflow runs: .venv/bin/mlflow ui --backend-store-uri {default_tracking_uri()}",
    ]
    for table in sorted(data.glob("scores/*/scores.md")):
        lines.append(f"\nCheckpoints compared ({table.parent.name}):\n{table.read_text()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--taxonomy", action="append", help="taxonomy version(s); default: every file in taxonomies/")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    materialize_all(args.taxonomy)
    print(summary(load_settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
