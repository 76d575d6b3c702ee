"""The IO manager of the data contract: hands each asset its upstream outputs as StageData.

Stages write their own files (Parquet tables, HF datasets, model folders) and return a
MaterializeResult, so nothing is stored here; loading an upstream reads its StageSpec from the
asset definition's metadata and points at data/<folder>[/<version>]. A partitioned upstream seen
from an unpartitioned asset (the comparison) comes as {version: StageData}.
"""

import dagster as dg

from ground.catalog import StageData, StageSpec, stage_folder
from ground.settings import Settings


class CatalogIOManager(dg.IOManager):
    """Upstream outputs by the catalog: data/<stage folder>[/<taxonomy version>]."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()}: stages write their own outputs and return a MaterializeResult")

    def load_input(self, context: dg.InputContext):
        asset = context.asset_key.to_user_string()
        spec = StageSpec.from_metadata(context.upstream_output.definition_metadata or {})
        root = self.settings.path()
        if not context.has_asset_partitions:
            return StageData(asset, spec, stage_folder(root, spec, None))
        keys = list(context.asset_partition_keys)
        data = {k: StageData(asset, spec, stage_folder(root, spec, k), k) for k in keys}
        # In a partitioned run the asset reads its own version; across versions it gets them all.
        return data[keys[0]] if context.has_partition_key and len(keys) == 1 else data


@dg.io_manager(required_resource_keys={"settings"}, description="Upstream outputs as StageData, by each stage's StageSpec.")
def catalog_io_manager(init_context) -> CatalogIOManager:
    # The run's own settings resource, so run-config overrides of data_dir reach the inputs too.
    return CatalogIOManager(init_context.resources.settings)
