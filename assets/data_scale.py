"""data_scale_ablation: SafeVid's data-scale experiment (its fig. 3) as one stage. DPO is trained
on a share of the preference pairs (data_scale.fractions, the paper's 1, 10, 50 and 100%), with the
DPO stage's settings and seeds, and each checkpoint answers the held-out benchmark with the real
frames; the judge role scores them as benchmark_scores does.

The full share is dpo_checkpoint itself, scored by benchmark_scores: its verdicts are read, not
trained again, so the 100% point is the number the results table shows. Each fraction is an
MLflow run of its own, nested in the stage's run (param data_fraction, its rates as metrics), so
MLflow's compare view lines them up; the plot (rate against fraction, with the cluster-bootstrap
interval by clip over the seeds' answers pooled) is in the Dagster metadata and the stage's run.
"""
import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import judged_answers, markdown_table, png_markdown, table_value
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord, replicate_folder
from ground.evaluation import scored, split_items
from ground.taxonomy import judge_items, judge_subcategories, subcategories_from_frame
from resources.k8s import training_op_tags
from resources.roles import build_role

SPEC = StageSpec(
    folder="data_scale",
    files=("fractions/", "verdicts.parquet", "ablation.parquet", "data_scale.png", "data_scale.md"),
    params=("data_scale", "dpo", "roles.judge"),
)
COLUMNS = ["fraction", "pairs", "seeds", "n_harmful", "n_benign", "safety_rate", "safety_ci_low", "safety_ci_high",
           "helpful_rate", "helpful_ci_low", "helpful_ci_high", "mlflow_run_id"]


def subset(dataset, fraction: float, seed: int):
    """A random share of the pairs, at least one; the same draw for every seed of the fraction."""
    n = max(1, int(round(fraction * len(dataset))))
    return dataset.shuffle(seed=seed).select(range(n))


def train_fraction(st: Stage, target_model: StageData, dataset, folder, device: str, run_id: str) -> CheckpointRecord:
    """The DPO job on this share, every seed of the DPO stage, logging its steps into the fraction's run."""
    from resources.launch import job_spec, launch_training

    d = st.settings.dpo
    seeds = [(d.seed, folder / "adapter")] + [(k, folder / replicate_folder(k)) for k in d.replicate_seeds]
    spec = job_spec(st, "dpo", seeds, device, base=target_model.folder)
    spec["mlflow"]["run_id"] = run_id
    launch_training(st, "jobs.dpo", spec, dataset)
    base = target_model.checkpoint()
    return CheckpointRecord.adapter_on(base, folder, d.replicate_seeds, name=f"dpo-{folder.name}", method="dpo",
                                       parent=base.name, taxonomy_version=st.version, seed=d.seed)


def fraction_verdicts(st: Stage, record: CheckpointRecord, bench: pd.DataFrame, subs: dict, judge) -> pd.DataFrame:
    """Every seed's answers to the benchmark with the real frames, judged."""
    from resources.generation_remote import answers_for, load_in_process
    from resources.video import load_frames_of

    videos, frames = load_frames_of(bench["frames_path"]), []
    for seeded in record.all_seeds():
        completions = answers_for(st.settings, seeded, videos, bench["query"].tolist(), st.settings.target_model.max_new_tokens,
                                  st.progress(f"{record.name} seed {seeded.seed or 0} answers"), st.settings.path("llm_cache"),
                                  loaded=load_in_process(st.settings, seeded))
        answers = judged_answers(completions, False)
        verdicts = judge.judge(judge_items(bench, subs, answers))
        frames.append(bench.assign(checkpoint=record.name, seed=int(seeded.seed or 0), frames="video", split=bench["kind"],
                                   answer=answers, safe=[v.safe for v in verdicts], helpful=[v.helpful for v in verdicts],
                                   failure=[v.failure for v in verdicts]))
    return pd.concat(frames, ignore_index=True)


def fraction_row(verdicts: pd.DataFrame, fraction: float, pairs: int, run_id: str) -> dict:
    """The fraction's held-out rates (ALL, in distribution), the seeds' answers pooled, intervals by clip."""
    r = scored(split_items(verdicts, "ALL"))
    return {"fraction": fraction, "pairs": pairs, "seeds": int(verdicts["seed"].nunique()), "mlflow_run_id": run_id,
            **{k: r[k] for k in COLUMNS[3:-1]}}


def scale_plot(table: pd.DataFrame):
    """Safety (must-refuse items) and helpful (benign items) rate against the share of pairs, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    x = 100 * table["fraction"].to_numpy()
    for rate, label in (("safety", "safety rate"), ("helpful", "helpful rate")):
        y = table[f"{rate}_rate"].to_numpy()
        err = np.clip(np.nan_to_num([y - table[f"{rate}_ci_low"], table[f"{rate}_ci_high"] - y]), 0, None)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}%" for v in x])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("share of the preference pairs DPO trains on")
    ax.set_title("data scale (held-out ALL, 95% bootstrap by clip)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ablation_rows(st: Stage, pairs, target_model: StageData, bench: pd.DataFrame, subs: dict, full: pd.DataFrame):
    """Per fraction, in its own nested MLflow run: train (the full share: dpo_checkpoint's own
    verdicts from benchmark_scores), answer, score. (rows, verdicts per fraction)."""
    import mlflow

    from resources import models

    judge, device = build_role("judge", st.settings), models.pick_device(st.settings.target_model.device)
    rows, verdicts = [], []
    # In the stage's experiment: a nested run otherwise goes to MLflow's default one, away from its parent.
    experiment = mlflow.active_run().info.experiment_id
    for fraction in sorted(st.settings.data_scale.fractions):
        with mlflow.start_run(run_name=f"data_scale {fraction:g}", nested=True, experiment_id=experiment,
                              tags={"taxonomy_version": st.version}) as run:
            mlflow.log_params({"data_fraction": fraction, "taxonomy_version": st.version})
            if fraction == 1.0:
                part, n = full, len(pairs)
            else:
                share = subset(pairs, fraction, st.settings.data_scale.seed)
                n = len(share)
                record = train_fraction(st, target_model, share, st.path("fractions") / f"{fraction:g}", device, run.info.run_id)
                part = fraction_verdicts(st, record, bench, subs, judge)
            row = fraction_row(part, fraction, n, run.info.run_id)
            mlflow.log_metrics({k: float(row[k]) for k in ("pairs", "safety_rate", "helpful_rate") if pd.notna(row[k])})
        st.log.info(f"data scale {fraction:g}: {n} pairs, safety {row['safety_rate']:.3f}, helpful {row['helpful_rate']:.3f}")
        rows.append(row)
        verdicts.append(part.assign(data_fraction=fraction))
    return rows, verdicts


@stage_asset(SPEC, op_tags=training_op_tags(), group="evaluation", partitioned=True, measures_despite=("alignment_gates",))
def data_scale_ablation(
    st: Stage, preference_pairs: StageData, target_model: StageData, dpo_checkpoint: StageData, safety_benchmark: StageData,
    safety_taxonomy: StageData, benchmark_scores: StageData,
) -> dg.MaterializeResult:
    """SafeVid's data-scale ablation: the DPO checkpoint trained on 1, 10, 50 and 100% of the pairs, scored on the held-out benchmark."""
    import mlflow
    from datasets import load_from_disk

    pairs = load_from_disk(str(preference_pairs.path("dataset")))
    bench = safety_benchmark.table("benchmark.parquet")
    bench = bench[bench["slice"] == "in"].reset_index(drop=True)
    subs = judge_subcategories(subcategories_from_frame(safety_taxonomy.table("subcategories.parquet")))
    full = benchmark_scores.table("verdicts.parquet")
    full = full[(full["checkpoint"] == dpo_checkpoint.checkpoint().name) & (full["frames"] == "video") & full["item_id"].isin(bench["item_id"])]
    rows, verdicts = ablation_rows(st, pairs, target_model, bench, subs, full)
    table = pd.DataFrame(rows, columns=COLUMNS)
    kept = ["data_fraction", "checkpoint", "seed", "item_id", "kind", "category", "harmful", "answer", "safe", "helpful", "failure"]
    st.write_table(pd.concat(verdicts, ignore_index=True)[kept], "verdicts.parquet")
    st.write_table(table, "ablation.parquet")
    fig = scale_plot(table)
    fig.savefig(st.path("data_scale.png"), dpi=90, bbox_inches="tight")
    shown = markdown_table(table.drop(columns=["mlflow_run_id"]).round(3), limit=20)
    st.path("data_scale.md").write_text(shown + "\n")
    for f in ("data_scale.png", "data_scale.md"):
        mlflow.log_artifact(str(st.path(f)))
    st.log.info(f"data scale:\n{shown}")
    return st.finish(
        {"ablation": table_value(table, decimals=3), "plot": dg.MetadataValue.md(png_markdown(fig)), "dagster/row_count": len(table)},
        metrics={f"data_scale.{rate}.{100 * r.fraction:g}pct": getattr(r, rate) for r in table.itertuples()
                 for rate in ("safety_rate", "helpful_rate") if pd.notna(getattr(r, rate))},
    )
