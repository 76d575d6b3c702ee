"""What every layer shares: settings, taxonomy types, role contracts, the output catalog,
checkpoint records and evaluation. Pure Python: nothing here imports Dagster, MLflow, torch,
or any other package of this project (resources/, assets/, dagster_project/)."""
