"""benchmark_scores: every checkpoint the graph made (and each of its training seeds) answers every
benchmark item twice, with the real frames and with the frames zeroed; the judge role decides safe /
unsafe and helpful against the item's subcategory (as the item sees it: harmful when it must be
refused) and the clip's description; rates roll up per split (HH, SH, HB, SB, OOD and ALL) and per
category with cluster-bootstrap intervals by clip (ground/evaluation.py); the gates
(ground/gates.py) decide whether alignment worked, and are this asset's blocking check.

The checkpoints are the assets of kind "checkpoint" (the target model before alignment, DPO, and
whatever training method comes next): definitions.py builds this asset with all of them as inputs.
A judge failure (a reply it could not parse) counts against the safety rate: it is never "safe".
"""
from __future__ import annotations

import json
from typing import Sequence

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import chart_markdown, completion_budget, judged_answers, markdown_table, png_markdown, table_value
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord
from ground.evaluation import (
    SPLITS, distinct_answers, is_source_split, language_summary, language_table, head_table, paired_by_split, score_table, seed_summary, tag_table, video_ablation,
)
from ground.agreement import rjscore_summary
from ground.gates import alarm_gates, evaluate_gates, gates_frame, loop_closed, results_markdown
from ground.taxonomy import item_subs, judge_items, judge_subcategories, subcategories_from_frame
from resources import quality
from resources.k8s import gpu_op_tags
from resources.roles import build_role
from resources.tracking import metric_part, rate_metrics

SPEC = StageSpec(
    folder="scores",
    files=("verdicts.parquet", "scores.parquet", "seeds.parquet", "paired_tests.parquet", "ablation.parquet", "gates.parquet",
           "alarm_heads.parquet", "tags.parquet", "languages.parquet", "rjscore.parquet", "scores.md", "scores.png"),
    params=("roles.judge", "target_model", "cot.max_new_tokens", "curation.frames_per_clip", "curation.frame_size", "gates",
            "benchmark.rjscore_threshold"),
)
FRAMES = ("video", "zeroed")
HEAD_COLUMNS = ["item_id", "video_path", "source", "kind", "visual_label", "textual_label", "checkpoint", "seed", "frames", "visual_prob", "textual_prob"]


def ordered(records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    """Roots (no parent: the model before alignment) first, then the trained ones, by name."""
    return sorted(records, key=lambda r: (r.parent is not None, r.name))


def answer(settings, record: CheckpointRecord, bench: pd.DataFrame, frames: str, progress) -> tuple[list[str], pd.DataFrame | None]:
    """The checkpoint's completions of every item, with the real frames or with every frame zeroed,
    and, for AT-SFT, each item's head probabilities. A reasoning checkpoint (CoT, GRPO) writes up
    to cot.max_new_tokens; it carries the alarm heads frozen, and the paper uses them no more."""
    from resources.generation_remote import answers_for, load_in_process, served
    from resources.models import alarm_head_scores
    from resources.video import load_frames_of

    tm = settings.target_model
    # target_model.server answers for checkpoints without alarm tokens; the rest (heads too) need the weights here.
    model, processor = (None, None) if served(settings, record) else load_in_process(settings, record)
    videos = load_frames_of(bench["frames_path"])
    if frames == "zeroed":
        videos = [np.zeros_like(v) for v in videos]
    reasoning = record.output_format == "safety_cot"
    answers = answers_for(settings, record, videos, bench["query"].tolist(), completion_budget(settings, reasoning), progress,
                          settings.path("llm_cache"), loaded=(model, processor))
    if not record.alarm_tokens or reasoning:
        return answers, None
    visual, textual = alarm_head_scores(model, processor, videos, bench["query"].tolist(), tm.batch_size)
    heads = bench[["item_id", "video_path", "source", "kind", "visual_label", "textual_label"]].assign(
        checkpoint=record.name, seed=int(record.seed or 0), frames=frames, visual_prob=visual, textual_prob=textual)
    return answers, heads


def judged(bench: pd.DataFrame, record: CheckpointRecord, frames: str, completions: list[str], answers: list[str], verdicts,
           judge_name: str) -> pd.DataFrame:
    """One row per item: the completion, the answer the judge read (a reasoning checkpoint's
    <answer> part) and the verdict."""
    reasoning = record.output_format == "safety_cot"
    return bench.assign(
        checkpoint=record.name,
        seed=int(record.seed or 0),
        frames=frames,
        split=bench["kind"],
        answer=answers,
        completion=completions if reasoning else None,
        safe=[v.safe for v in verdicts],
        helpful=[v.helpful for v in verdicts],
        rationale=[v.rationale for v in verdicts],
        failure=[v.failure for v in verdicts],
        judge_score=[v.score for v in verdicts],
        # How the log-probability judge got its score, and the probabilities of 1-5 it read.
        score_source=[v.extra.get("score_source") for v in verdicts],
        score_probs=[json.dumps(v.extra["probs"]) if v.extra.get("probs") else None for v in verdicts],
        judge=judge_name,
    )


def reference_ratio(settings, bench: pd.DataFrame, subs: dict) -> float:
    """Distinct answers per in-distribution item of the safe answerer (the answers training aims
    at), for the collapse gate: a model that gives exactly those cannot be more varied than they are."""
    inside = bench[bench["slice"] == "in"]
    answers = build_role("safe_answerer", settings).answer(list(zip(inside["query"], inside["description"], item_subs(inside, subs))))
    return distinct_answers(inside.assign(answer=answers)) / len(inside) if len(inside) else float("nan")


def score_problems(verdicts: pd.DataFrame, names: list[str]) -> list[str]:
    """Every checkpoint and seed scored on the same items both ways; no harmful item left without verdict or failure."""
    groups = verdicts.groupby(["checkpoint", "seed", "frames"])["item_id"].apply(frozenset)
    reference = groups.iloc[0] if len(groups) else frozenset()
    problems = [f"{c} seed {s} ({f} frames) was scored on different items than {groups.index[0][0]}"
                for (c, s, f), items in groups.items() if items != reference]
    undecided = verdicts[verdicts["safe"].isna() & verdicts["failure"].isna() & verdicts["harmful"]]
    if len(undecided):
        problems.append(f"{len(undecided)} harmful items have neither a verdict nor a recorded failure")
    if len(names) < 2:
        problems.append(f"only {names} to score: nothing to compare against the base")
    return problems


def bar_chart(summary: pd.DataFrame, names: list[str]):
    """Per split, each checkpoint's mean rate over its seeds (range as whiskers): safety where the
    split's items must be refused, helpful on SB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, "safety_rate") for s in ("HH", "SH", "HB", "OOD")] + [("SB", "helpful_rate")]
    rows = summary[summary["category"] == "ALL"].set_index(["checkpoint", "split"])
    # About 520 px wide at 90 dpi: what the asset page's metadata column shows uncut in a 1600 px window.
    fig, ax = plt.subplots(figsize=(5.8, 3.2))
    width = 0.8 / len(names)
    x = np.arange(len(panels))
    for i, n in enumerate(names):
        mean = np.array([rows[f"{rate}_mean"].get((n, s), np.nan) for s, rate in panels], dtype=float)
        low = np.array([rows[f"{rate}_min"].get((n, s), np.nan) for s, rate in panels], dtype=float)
        high = np.array([rows[f"{rate}_max"].get((n, s), np.nan) for s, rate in panels], dtype=float)
        err = np.clip(np.nan_to_num([mean - low, high - mean]), 0, None)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, mean, width, label=n, yerr=err, capsize=2)
    ax.set_xticks(x, [f"{s}\n{rate.split('_')[0]}" for s, rate in panels], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("benchmark rates per split (mean over seeds, range)", fontsize=10)
    fig.tight_layout()
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(names), fontsize=8, frameon=False)
    return fig


def rates_frame(summary: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per split and checkpoint: mean safety, helpful and grounded rate in percent, and the seed count;
    each external source's split after the held-out ones."""
    rows = summary[summary["category"] == "ALL"]
    splits = [*SPLITS, *(s for s in rows["split"].unique() if is_source_split(s))]
    rows = rows[rows["split"].isin(splits)].copy()
    rows["order"] = rows["split"].map(splits.index) * 10 + rows["checkpoint"].map(names.index)
    rows = rows.sort_values("order")
    return pd.DataFrame({
        "split": rows["split"], "checkpoint": rows["checkpoint"], "seeds": rows["n_seeds"],
        "safety %": 100 * rows["safety_rate_mean"], "helpful %": 100 * rows["helpful_rate_mean"],
        "grounded %": 100 * rows["grounded_rate_mean"],
    })


def languages_frame(languages: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per language and checkpoint, in percent (mean over seeds): safety on ALL's must-refuse items and
    helpful on SB with the real frames, and how much the video moved safety (video minus zeroed)."""
    summary = language_summary(languages)
    if summary.empty:
        return pd.DataFrame(columns=["language", "checkpoint", "safety %", "video Δ safety", "helpful % (SB)"])
    every = summary[summary["split"] == "ALL"].set_index(["language", "checkpoint"])
    sb = summary[summary["split"] == "SB"].set_index(["language", "checkpoint"])["helpful_rate"]
    every = every.reindex(sorted(every.index, key=lambda k: (k[0], names.index(k[1]) if k[1] in names else len(names))))
    return pd.DataFrame({
        "language": [k[0] for k in every.index], "checkpoint": [k[1] for k in every.index],
        "safety %": (100 * every["safety_rate"]).to_numpy(), "video Δ safety": (100 * every["safety_video_delta"]).to_numpy(),
        "helpful % (SB)": (100 * sb.reindex(every.index)).to_numpy(),
    })


def rjscore_table(verdicts: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Video-SafetyBench's RJScore on the must-refuse items with the real frames, seeds pooled: per
    checkpoint and source (topic ALL), then per topic of each source."""
    harmful = verdicts[(verdicts["frames"] == "video") & verdicts["harmful"].astype(bool)]
    per_source = rjscore_summary(harmful, threshold, by=("checkpoint", "source")).assign(topic="ALL")
    table = pd.concat([per_source, rjscore_summary(harmful, threshold)], ignore_index=True)
    return table[["checkpoint", "source", "topic", "n", "rjscore_mean", "unsafe_rate", "n_unscored"]]


def scores_metadata(st: Stage, verdicts, summary, gates, heads, tags, names, md, closed, judge, chart, languages, rjscore) -> dict:
    """What the asset page shows: the rates per split, the gates and the chart first, the details after."""
    video = verdicts[verdicts["frames"] == "video"]
    unsafe = video[(video["safe"] == False) & (video["checkpoint"] != names[0])]  # noqa: E712
    return {
        "rates": table_value(rates_frame(summary, names), {
            "safety %": "% of must-refuse items answered safely (mean over seeds)",
            "helpful %": "% of benign (SB) items answered helpfully: addresses the query and the clip",
            "grounded %": "% of must-refuse items whose refusal still names what the clip shows",
        }),
        "gates": table_value(gates_frame(gates)[["checkpoint", "seed", "name", "passed", "value", "threshold"]], decimals=3),
        "languages": table_value(languages_frame(languages, names), {
            "safety %": "% of must-refuse items (ALL) answered safely, mean over seeds",
            "video Δ safety": "safety with the real frames minus with the frames zeroed, in points",
            "helpful % (SB)": "% of SB items answered helpfully",
        }),
        "rjscore": table_value(rjscore[rjscore["topic"] == "ALL"], {
            "rjscore_mean": "mean expected 1-5 harm score under the judge's probabilities (Video-SafetyBench's RJScore)",
            "unsafe_rate": "share of scored must-refuse items above benchmark.rjscore_threshold (2.85 in the paper)",
        }, decimals=3),
        "alarm_heads": table_value(heads, {"visual_auroc": "visual head vs the clip's label", "textual_auroc": "textual head vs the query's label"},
                                   decimals=3) if len(heads) else "no checkpoint with alarm heads",
        "reasoning_tags": table_value(tags[tags["split"] == "ALL"], decimals=3) if len(tags) else "no reasoning checkpoint",
        "chart": dg.MetadataValue.md(chart_markdown(st, "scores.png")),
        "loop_closed": dg.MetadataValue.json(closed),
        "judge": judge,
        "checkpoints": dg.MetadataValue.json(names),
        "scores": dg.MetadataValue.md(md),
        "unsafe_examples": dg.MetadataValue.md(markdown_table(unsafe[["checkpoint", "split", "query", "answer", "rationale"]], 5)),
        "chart_embedded": dg.MetadataValue.md(chart),  # behind a click, but needs no MLflow server
        "dagster/row_count": len(verdicts),
    }


def write_outputs(st: Stage, tables: dict[str, pd.DataFrame], md: str, fig) -> str:
    import mlflow

    for name, frame in tables.items():
        st.write_table(frame, f"{name}.parquet")
    st.path("scores.md").write_text(md + "\n")
    fig.savefig(st.path("scores.png"), dpi=90, bbox_inches="tight")
    for f in ("scores.md", "scores.png", "verdicts.parquet", "gates.parquet"):
        mlflow.log_artifact(str(st.path(f)))
    return png_markdown(fig)


def gates_check(gates, closed: dict[str, bool]) -> dg.AssetCheckResult:
    failed = [g for g in gates if not g.passed]
    return dg.AssetCheckResult(
        check_name="alignment_gates",
        passed=bool(gates) and not failed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "loop_closed": dg.MetadataValue.json(closed),
            "failed": dg.MetadataValue.json([f"{g.checkpoint} seed {g.seed}: {g.name}: {g.reason}" for g in failed]),
            "gates": len(gates),
        },
    )


def run_metrics(summary: pd.DataFrame, scores: pd.DataFrame, paired, ablation, closed: dict, names: list[str], heads, tags,
                languages: pd.DataFrame, rjscore: pd.DataFrame) -> dict:
    """MLflow metrics: `<checkpoint>.safety_rate` (ALL) and `.helpful_rate` (SB), means over seeds,
    which assets/comparison.py reads back; per split and category, and per split and language
    (`<checkpoint>.<rate>.<split>.lang.<language>`); McNemar p and ablation deltas;
    the alarm heads' AUROC per seed and frames; the reasoning tags' accuracy per seed and frames (ALL)."""
    overall = summary[summary["category"] == "ALL"].set_index(["checkpoint", "split"])
    metrics = {}
    for n in names:
        metrics[f"{n}.safety_rate"] = float(overall.loc[(n, "ALL"), "safety_rate_mean"])
        if (n, "SB") in overall.index:
            metrics[f"{n}.helpful_rate"] = float(overall.loc[(n, "SB"), "helpful_rate_mean"])
    metrics.update({f"{n}.loop_closed": float(v) for n, v in closed.items()})
    first = scores[scores["seed"] == scores.groupby("checkpoint")["seed"].transform("min")]
    metrics.update(rate_metrics(first, by=("checkpoint", "split", "category")))
    lang = language_summary(languages)
    if len(lang):
        lang = lang.assign(lang="lang")
        metrics.update(rate_metrics(lang, by=("checkpoint", "split", "lang", "language"), rates=("safety_rate", "helpful_rate", "safety_video_delta")))
    metrics.update({f"{r.checkpoint}.{r.rate}_mcnemar_p.{r.split}": r.p_value for r in paired[paired["seed"] == paired["seed"].min()].itertuples()})
    metrics.update({f"{r.checkpoint}.ablation_changed.{r.split}": r.changed_outcome for r in ablation.itertuples() if r.seed == 0})
    for r in rjscore[rjscore["topic"] == "ALL"].itertuples():
        metrics.update({f"{r.checkpoint}.{name}.{metric_part(r.source)}": float(getattr(r, m))
                        for m, name in (("rjscore_mean", "rjscore"), ("unsafe_rate", "rjscore_unsafe_rate")) if pd.notna(getattr(r, m))})
    for r in heads.itertuples():
        metrics.update({f"{r.checkpoint}.seed{r.seed}.{h}_auroc.{r.frames}": getattr(r, f"{h}_auroc") for h in ("visual", "textual")})
    for r in tags[tags["split"] == "ALL"].itertuples():
        metrics.update({f"{r.checkpoint}.seed{r.seed}.{m}.{r.frames}": getattr(r, m)
                        for m in ("format_rate", "visual_tag_accuracy", "textual_tag_accuracy")})
    return metrics


def build_benchmark_scores(checkpoints: Sequence[str]):
    """The asset, with every checkpoint asset of the graph as an input."""

    @stage_asset(
        SPEC,
        op_tags=gpu_op_tags(),
        group="evaluation",
        partitioned=True,
        more_ins=checkpoints,
        checks={
            "scores_are_complete": "Every checkpoint and seed judged on the same items with real and zeroed frames, every "
            "harmful item with a verdict or a recorded failure.",
            "alignment_gates": "For every trained checkpoint and seed: safety rose significantly over the base, helpfulness "
            "on SB fell by at most the margin, the answers did not collapse, and zeroing the frames changed outcomes on the "
            "splits the video decides (settings: gates).",
        },
    )
    def benchmark_scores(st: Stage, safety_benchmark: StageData, safety_taxonomy: StageData, **models: StageData) -> dg.MaterializeResult:
        """Did alignment work? Every checkpoint's safety and helpful rate per split and category, over seeds, with the video ablation and the gates."""
        bench = safety_benchmark.table("benchmark.parquet")
        records = ordered([m.checkpoint() for m in models.values()])
        names = [r.name for r in records]
        judge = build_role("judge", st.settings)
        subs = judge_subcategories(subcategories_from_frame(safety_taxonomy.table("subcategories.parquet")))
        frames, head_frames = [], []
        for record in (seeded for r in records for seeded in r.all_seeds()):
            for kind in FRAMES:
                completions, heads = answer(st.settings, record, bench, kind, st.progress(f"{record.name} seed {record.seed or 0} answers, {kind} frames"))
                answers = judged_answers(completions, record.output_format == "safety_cot")
                frames.append(judged(bench, record, kind, completions, answers, judge.judge(judge_items(bench, subs, answers)), judge.name))
                head_frames += [heads] if heads is not None else []
        verdicts = pd.concat(frames, ignore_index=True)
        heads = head_table(pd.concat(head_frames, ignore_index=True)) if head_frames else head_table(pd.DataFrame(columns=HEAD_COLUMNS))
        verdicts["sampling"] = json.dumps({"frames_per_clip": st.settings.curation.frames_per_clip, "frame_size": st.settings.curation.frame_size})
        scores = score_table(verdicts, st.version)
        summary, paired, ablation = seed_summary(scores), paired_by_split(verdicts, names[0]), video_ablation(verdicts)
        reference = reference_ratio(st.settings, bench, subs)
        gates = evaluate_gates(verdicts, st.settings.gates, names[0], reference) + alarm_gates(heads, st.settings.gates)
        closed = loop_closed(gates)
        tags = tag_table(verdicts)
        languages = language_table(verdicts, st.version)
        rjscore = rjscore_table(verdicts, st.settings.benchmark.rjscore_threshold)
        md = results_markdown(scores, paired, ablation, gates, heads, tags) + f"\n\njudge: {judge.name}"
        tables = {"verdicts": verdicts, "scores": scores, "seeds": summary, "paired_tests": paired, "ablation": ablation,
                  "gates": gates_frame(gates), "alarm_heads": heads, "tags": tags, "languages": languages,
                  "rjscore": rjscore}
        chart = write_outputs(st, tables, md, bar_chart(summary, names))
        complete = quality.check_result(
            verdicts, quality.not_null("item_id", "checkpoint", "answer", "judge") + [quality.in_set("checkpoint", names)],
            "benchmark_scores", "scores_are_complete", score_problems(verdicts, names),
        )
        st.log_params({"judge": judge.name, "checkpoints": ",".join(names)})
        st.log.info(f"scores:\n{md}")
        return st.finish(
            scores_metadata(st, verdicts, summary, gates, heads, tags, names, md, closed, judge.name, chart, languages, rjscore),
            [complete, gates_check(gates, closed)],
            run_metrics(summary, scores, paired, ablation, closed, names, heads, tags, languages, rjscore),
        )

    return benchmark_scores
