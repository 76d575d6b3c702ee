"""The training jobs: one entry point per method (`python -m jobs.dpo`, `jobs.at_sft`, `jobs.cot`,
`jobs.grpo`), which a stage launches under `accelerate launch` through Dagster Pipes
(resources/launch.py). They sit between resources and assets: they use the trainers in resources/,
and no asset imports them (a stage names its job's module).
"""
