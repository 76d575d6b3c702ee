"""The metadata a person reads in the Dagster UI: markdown tables, counts, inline plots.

What the UI shows without a click (dagster-webserver 1.13, MetadataEntry.tsx): table metadata always,
markdown only under 1,000 characters (longer ones sit behind "[Show Markdown]"), so a chart goes in as
a short image link to the MLflow server rather than an inline base64 PNG; floats print all digits.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import math
from pathlib import Path
from typing import Sequence

import dagster as dg
import numpy as np
import pandas as pd

from ground.evaluation import rates, verdict_frame
from ground.roles import QueryRequest
from ground.taxonomy import judge_items
from resources.video import load_frames_of


def markdown_table(df: pd.DataFrame, limit: int = 10, width: int = 80) -> str:
    if df.empty:
        return "_empty_"
    head = df.head(limit)
    cells = [[str(v).replace("|", "/").replace("\n", " ")[:width] for v in row] for row in head.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, head.columns)) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    if len(df) > limit:
        lines.append(f"\n_{len(df) - limit} more rows_")
    return "\n".join(lines)


def counts_table(df: pd.DataFrame, column: str) -> str:
    counts = df[column].value_counts().sort_index().rename_axis(column).reset_index(name="count")
    return markdown_table(counts, limit=100)


def table_metadata(
    df: pd.DataFrame, path: Path, preview: list[str] | None = None, category: str | None = None
) -> dict:
    meta = {
        "dagster/row_count": len(df),
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(markdown_table(df[preview] if preview else df)),
    }
    if category and category in df.columns:
        meta[f"per_{category}"] = dg.MetadataValue.md(counts_table(df, category))
    return meta


SIGNIFICANT_DIGITS = 4


def round_sig(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """x to `digits` significant digits, for display (0.20967741935483872 -> 0.2097)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits - 1}e}")


def _rounded(value, digits: int):
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return round_sig(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def display_metadata(metadata: dict, digits: int = SIGNIFICANT_DIGITS) -> dict:
    """Every float, plain or inside JSON, rounded for the UI; tables, markdown and the rest as given.
    The exact values stay in the stage's Parquet tables and MLflow metrics."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, dg.FloatMetadataValue) and value.value is not None:
            value = dg.MetadataValue.float(round_sig(value.value, digits))
        elif isinstance(value, dg.JsonMetadataValue):
            value = dg.MetadataValue.json(_rounded(value.data, digits))
        elif isinstance(value, (float, dict, list)) and not isinstance(value, bool):
            value = _rounded(value, digits)
        out[key] = value
    return out


def _cell(v):
    """A table cell as JSON can carry it: NaN and None become empty, numpy scalars Python ones."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _column_type(dtype) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def table_value(df: pd.DataFrame, descriptions: dict[str, str] | None = None, decimals: int = 1) -> dg.TableMetadataValue:
    """A small frame as Dagster table metadata, which the UI renders inline; floats to `decimals` places."""
    descriptions = descriptions or {}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(str(c), _column_type(df[c].dtype), description=descriptions.get(str(c))) for c in df.columns]
    )
    rows = df.round({c: decimals for c in df.columns if pd.api.types.is_float_dtype(df[c].dtype)})
    records = [dg.TableRecord({str(c): _cell(v) for c, v in zip(df.columns, row)}) for row in rows.itertuples(index=False)]
    return dg.MetadataValue.table(records, schema)


def image_markdown(src: str, alt: str, link: str | None = None, path: Path | None = None) -> str:
    """An image by URL (short, so the UI renders it inline), with a link to open it and its file path."""
    lines = [f"![{alt}]({src})"]
    where = [f"[open in MLflow]({link})"] if link else []
    where += [f"file: `{path}`"] if path else []
    if where:
        lines.append(" · ".join(where))
    return "\n\n".join(lines)


def chart_markdown(st, name: str) -> str:
    """A chart the stage logged to its MLflow run (`name` at the run's artifact root), as markdown: the
    image served by the MLflow UI (shown inline while `mlflow ui` runs), a link to it there, its file."""
    tracker = st.context.resources.mlflow
    return image_markdown(tracker.artifact_url(st.run, name), name, tracker.run_url(st.run, name), st.path(name))


def png_markdown(fig) -> str:
    """A matplotlib figure inline as markdown, so the Dagster UI shows the plot itself."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f"![plot](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def loss_plot(losses: list[float], title: str) -> str:
    """A training loss curve as inline markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    md = png_markdown(fig)
    plt.close(fig)
    return md


KINDS = ("HH", "SH", "HB", "SB")


def training_rows_problems(rows: pd.DataFrame) -> list[str]:
    """What GX does not say of training rows: every kind present, every video and frames file on disk."""
    problems = []
    missing_kinds = [k for k in KINDS if not (rows["kind"] == k).any()]
    if missing_kinds:
        problems.append(f"no train rows of kind {missing_kinds}: the model would never see that combination of labels")
    for column in ("video_path", "frames_path"):
        missing = [p for p in rows[column].unique() if not Path(p).exists()]
        if missing:
            problems.append(f"{len(missing)} {column} files do not exist, e.g. {missing[:3]}")
    return problems


def labelled_rows_check(rows: pd.DataFrame, columns: list[str], non_empty: str, asset: str, check_name: str,
                        problems: list[str]) -> dg.AssetCheckResult:
    """The GX suite of training rows with per-modality labels (every column set, one row per query,
    0/1 labels, the four kinds, `non_empty` text) plus the stage's own problems, as one check."""
    from resources import quality

    return quality.check_result(
        rows,
        quality.not_null(*columns)
        + [
            quality.unique("query_id"),
            quality.in_set("visual_label", {0, 1}),
            quality.in_set("textual_label", {0, 1}),
            quality.in_set("kind", set(KINDS)),
            quality.Expect("ColumnValueLengthsToBeBetween", {"column": non_empty, "min_value": 1}),
        ],
        asset, check_name, problems + training_rows_problems(rows),
    )


def save_dataset(rows: pd.DataFrame, folder: Path) -> Path:
    """HF datasets save_to_disk, replacing an older copy."""
    import shutil

    from datasets import Dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = Dataset.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# --- Validation: what every training stage reports its settings on ---------------------------

def judge_answers(judge, held: pd.DataFrame, answers: list[str], subs: dict):
    """Verdicts on answers to the validation queries, and their safety / helpful rates."""
    verdicts = judge.judge(judge_items(held, subs, answers))
    return verdicts, rates(verdict_frame(verdicts, held["harmful"].astype(bool).tolist()))


def base_validation_answers(st, target_model, base, held: pd.DataFrame, device: str) -> list[str]:
    """The base model's validation answers: from target_model's answers where it has them, else generated."""
    from resources import models

    path = target_model.path("base_answers.parquet")
    if path.exists():
        known = pd.read_parquet(path)
        known = known[known["split"] == "validation"].set_index("query_id")
        if set(held["query_id"]) <= set(known.index):
            return known.loc[held["query_id"], "answer"].tolist()
    tm = st.settings.target_model
    model, proc = models.load_video_llm(base.weights(), device=device)
    return models.generate_answers(model, proc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size)


def completion_budget(settings, reasoning: bool) -> int:
    """Most new tokens per answer: a reasoning checkpoint (CoT, GRPO) writes reasoning, answer and tags."""
    return settings.cot.max_new_tokens if reasoning else settings.target_model.max_new_tokens


def judged_answers(completions: list[str], reasoning: bool) -> list[str]:
    """What the judge reads: the <answer> part of a reasoning checkpoint's completion, else all of it."""
    from ground.safety_cot import answer_part

    return [answer_part(c) for c in completions] if reasoning else list(completions)


def adapter_validation(st, base, target_model, held: pd.DataFrame, subs, device: str, adapter: Path, what: str,
                       reasoning: bool = False) -> dict:
    """The trained adapter reloads through the same code path as any model and answers the
    validation queries (the split settings are chosen on; the benchmark stays for benchmark_scores);
    the judge rates them beside the base model's answers. A reasoning checkpoint (CoT, GRPO) writes
    up to cot.max_new_tokens; the judge reads its <answer> part, and its tags are scored with the
    real frames and with the frames zeroed (`tags`)."""
    import time

    from ground.safety_cot import tag_rates
    from resources import models
    from resources.roles import build_role

    tm = st.settings.target_model
    max_new = completion_budget(st.settings, reasoning)
    aligned, proc = models.load_video_llm(base.weights(), device=device, adapter=adapter)
    videos, queries = load_frames_of(held["frames_path"]), held["query"].tolist()
    t0 = time.time()
    completions = models.generate_answers(aligned, proc, videos, queries, max_new, tm.batch_size, progress=st.progress(f"{what} validation answers"))
    seconds = time.time() - t0
    answers = judged_answers(completions, reasoning)
    judge = build_role("judge", st.settings)
    verdicts, aligned_rates = judge_answers(judge, held, answers, subs)
    _, base_rates = judge_answers(judge, held, base_validation_answers(st, target_model, base, held, device), subs)
    sample = held.assign(answer=answers, judged_safe=[v.safe for v in verdicts])
    out = {"answers": sample, "aligned": aligned_rates, "base": base_rates, "seconds": seconds, "judge": judge}
    if reasoning:
        import numpy as np

        zeroed = models.generate_answers(aligned, proc, [np.zeros_like(v) for v in videos], queries, max_new, tm.batch_size)
        labels = (held["visual_label"], held["textual_label"])
        out["tags"] = {"video": tag_rates(completions, *labels), "zeroed": tag_rates(zeroed, *labels)}
        out["answers"] = sample.assign(completion=completions)
    return out


# --- The reasoning stages (CoT, GRPO): one adapter per seed from the parent's adapter of that seed ---

def training_dataset(data):
    """The HF dataset an upstream data stage saved under dataset/."""
    from datasets import load_from_disk

    folder = data.path("dataset")
    if not folder.exists():
        from ground.catalog import MissingOutput

        raise MissingOutput(f"{folder} is missing: materialize {data.asset!r} for partition {data.version} first")
    dataset = load_from_disk(str(folder))
    if len(dataset) == 0:
        raise ValueError(f"{folder} holds no rows: nothing to train on")
    return dataset


def reasoning_summary(trained: list[dict], ev: dict) -> dict:
    tags = ev["tags"]
    return {
        "steps": len(trained[0]["history"]),
        "train_seconds": round(sum(t["train_seconds"] for t in trained), 1),
        "loss_first_step": round(trained[0]["history"][0]["loss"], 4) if trained[0]["history"] else None,
        "loss_last_step": round(trained[0]["history"][-1]["loss"], 4) if trained[0]["history"] else None,
        "validation_format_rate": round(tags["video"]["format_rate"], 4),
        "validation_visual_tag_accuracy": round(tags["video"]["visual_tag_accuracy"], 4),
        "validation_visual_tag_accuracy_zeroed": round(tags["zeroed"]["visual_tag_accuracy"], 4),
        "validation_textual_tag_accuracy": round(tags["video"]["textual_tag_accuracy"], 4),
        "validation_refusal_rate_aligned": round(ev["aligned"]["safety_rate"], 4),
        "validation_helpful_rate_aligned": round(ev["aligned"]["helpful_rate"], 4),
        "validation_refusal_rate_base": round(ev["base"]["safety_rate"], 4),
        "validation_helpful_rate_base": round(ev["base"]["helpful_rate"], 4),
    }


def reasoning_check(name: str, problems: list[str], trained: list[dict], summary: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "trainable_tensors": len(trained[0]["trainable"]),
            "lora_tensors_changed": trained[0]["lora_changed"],
            "validation_format_rate": summary["validation_format_rate"],
            "validation_visual_tag_accuracy": summary["validation_visual_tag_accuracy"],
            "validation_visual_tag_accuracy_zeroed": summary["validation_visual_tag_accuracy_zeroed"],
        },
    )


def validation_metadata(losses: list[float], title: str, key: str, sample: pd.DataFrame, columns: list[str], limit: int,
                        width: int = 80) -> dict:
    """A training stage's loss curve and, under `key`, a shuffled sample of its validation answers."""
    return {
        "loss_curve": dg.MetadataValue.md(loss_plot(losses, title) if losses else "_no steps_"),
        key: dg.MetadataValue.md(
            markdown_table(sample[columns].sample(frac=1, random_state=0), limit=limit, width=width)
        ),
    }


def train_seeds(st, target_model, parent_data, dataset, device: str, block: str, job: str) -> list[dict]:
    """The main seed into adapter/, each replicate seed into replicates/seed<k>, each from the
    parent's adapter of its seed: one launched job (`job`, a module of jobs/) trains them all."""
    from ground.checkpoints import replicate_folder
    from resources.launch import job_spec, launch_training

    settings = st.settings.section(block)
    parent = parent_data.checkpoint()
    seeds = [(settings.seed, st.path("adapter"))] + [(k, st.out.folder / replicate_folder(k)) for k in settings.replicate_seeds]
    for k, _ in seeds:
        parent.of_seed(k, block)  # a seed the parent lacks fails here, before the launch
    spec = job_spec(st, block, seeds, device, base=target_model.folder, parent=parent_data.folder)
    results, _ = launch_training(st, job, spec, dataset)
    return results


def reasoning_validation(st, base, target_model, adversarial_queries, safety_taxonomy, device: str, what: str) -> dict:
    """The main seed's validation completions, judged on their <answer>, with their tags (adapter_validation)."""
    from ground.taxonomy import subcategories_from_frame

    queries = adversarial_queries.table("queries.parquet")
    held = queries[queries["split"] == "validation"].reset_index(drop=True)
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    return adapter_validation(st, base, target_model, held, subs, device, st.path("adapter"), what, reasoning=True)


def finish_reasoning(st, base, parent, block: str, name: str, method: str, description: str, trained: list[dict], ev: dict,
                     problems: list[str], summary: dict, check_name: str, extra: dict | None = None) -> dg.MaterializeResult:
    """A reasoning stage's end: the adapter registered when the check passed, its record
    (output_format safety_cot, the alarm state along), the validation completions, the metadata."""
    from ground.checkpoints import CheckpointRecord

    st.log.info(f"{name}: {summary}")
    registered = register_adapter_version(st, base, not problems, ev, name, method, f"videosafety-{name}-adapter-{st.settings.profile}",
                                          description)
    settings = st.settings.section(block)
    record_path = CheckpointRecord.adapter_on(
        base, st.out.folder, settings.replicate_seeds, name=name, method=method, parent=parent.name, taxonomy_version=st.version,
        mlflow_run_id=st.run.info.run_id, registered_model_version=registered, settings=st.settings.flat(block), seed=settings.seed,
        alarm_tokens=True, output_format="safety_cot",
    ).save(st.out.folder)
    sample = ev["answers"][["query_id", "kind", "subcategory", "harmful", "query", "completion", "answer", "judged_safe"]]
    st.write_table(sample, "validation_answers.parquet")
    metadata = {
        "checkpoint": dg.MetadataValue.path(str(record_path)), "parent": parent.name, **summary,
        "registered_model_version": registered or "not registered (check failed)",
        "replicate_seeds": dg.MetadataValue.json(list(settings.replicate_seeds)), **(extra or {}),
        **validation_metadata([h["loss"] for h in trained[0]["history"]], f"{name} loss", "validation_completions",
                              sample, ["kind", "query", "completion", "judged_safe"], limit=8, width=200),
    }
    return st.finish(metadata, [reasoning_check(check_name, problems, trained, summary)], summary)


def reasoning_problems(ev: dict, gates) -> list[str]:
    """A reasoning checkpoint's validation completions: in format, and a vidType that reads the video."""
    video, zeroed = ev["tags"]["video"], ev["tags"]["zeroed"]
    problems = []
    if not video["format_rate"] >= gates.min_format_rate:
        problems.append(f"{video['format_rate']:.0%} of validation completions in the four-tag format < {gates.min_format_rate:.0%} "
                        "(cut at cot.max_new_tokens, or the format was not learned)")
    if not video["visual_tag_accuracy"] >= gates.min_visual_tag_accuracy:
        problems.append(f"vidType right on {video['visual_tag_accuracy']:.0%} of validation items < {gates.min_visual_tag_accuracy:.0%}")
    elif not zeroed["visual_tag_accuracy"] < gates.min_visual_tag_accuracy:
        problems.append(f"vidType still right on {zeroed['visual_tag_accuracy']:.0%} with the frames zeroed: it reads the text, not the video")
    empty = int((ev["answers"]["answer"].str.strip() == "").sum())
    if empty:
        problems.append(f"{empty} of {len(ev['answers'])} validation completions have an empty answer")
    return problems


def seed_problems(t: dict, every_forward: bool) -> list[str]:
    """What one seed's training run broke: frozen weights, a forward without the video (every one, or
    with generation's decode steps in between: some), a non-finite loss, a policy that did not move."""
    problems = [f"seed {t['seed']}: {p}" for p in t["frozen_problems"]]
    f = t["video_forwards"]
    if f["with_video"] == 0 or (every_forward and f["with_video"] != f["forwards"]):
        problems.append(f"seed {t['seed']}: {f['with_video']} of {f['forwards']} forwards had the video")
    losses = [h["loss"] for h in t["history"]]
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"seed {t['seed']}: {len(losses)} logged steps, loss not finite throughout")
    if t["lora_changed"] == 0:
        problems.append(f"seed {t['seed']}: no LoRA weight changed: the policy did not move")
    return problems


def register_adapter_version(st, base, passed: bool, ev: dict, checkpoint: str, method: str, registered_name: str,
                             description: str) -> str | None:
    """The adapter folder as a run artifact with its input/output signature, and (only when the check
    passed) a registered model version tagged with its taxonomy version, checkpoint, method and
    validation rates, which moves the version's `latest-` alias and, when it is the best one, its
    `champion-` alias."""
    import mlflow

    from resources.training import adapter_signature, log_adapter, register_adapter, registry_tags

    cur = st.settings.curation
    log_adapter(st.path("adapter"), adapter_signature(cur.frames_per_clip, cur.frame_size),
                base.name if base.base_model_local else base.base_model, method)
    if not passed:
        return None
    info = st.run.info
    tags = registry_tags(st.version, checkpoint, method, passed, ev["aligned"], ev["base"])
    registered = register_adapter(st.context.resources.mlflow.client(), info.run_id, info.artifact_uri, registered_name, tags,
                                  description=description)
    mlflow.set_tag("registered_model_version", registered)
    return registered


# --- A query set: candidates per (clip, subcategory) from the query writer, the adversarial filter,
# near-duplicate removal and the clip splits. adversarial_queries writes one per taxonomy version;
# target_model the one of `target_model.pretraining_taxonomy`, with the same roles and cache.

def clip_splits(clips: pd.DataFrame, heldout: float, validation: float, seed: int) -> dict[str, str]:
    """clip_id → train / validation / heldout: a stable share of each visual label's clips (at least
    one heldout), so every split holds safe and harmful clips."""
    out = {}
    for _, group in clips.groupby("visual_label", sort=True):
        ranked = sorted(group["clip_id"], key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
        n_held = max(1, round(heldout * len(ranked)))
        n_val = round(validation * len(ranked))
        for i, clip in enumerate(ranked):
            out[clip] = "heldout" if i < n_held else "validation" if i < n_held + n_val else "train"
    return out


def intent_pool(sub, pool: str):
    """The subcategory with only its pool's intents: the first half trains, the second half evaluates."""
    half = (len(sub.intents) + 1) // 2
    intents = sub.intents[:half] if pool == "train" or len(sub.intents) < 2 else sub.intents[half:]
    return dataclasses.replace(sub, intents=intents)


def kind_of(textual_label: int, visual_label: int) -> str:
    return ("H" if visual_label else "S") + ("H" if textual_label else "B")


def near_duplicate_mask(embeddings: np.ndarray, groups: list[str], threshold: float, block: int = 1024) -> np.ndarray:
    """Keep the first of every set of queries (within one group) at cosine similarity >= threshold.

    Greedy in input order: an item is dropped when it is that similar to an item kept before it in
    its group. A group's items go in blocks: one matrix product against the items kept by earlier
    blocks, one within the block, whose near-duplicate pairs then replay the greedy order."""

    def similar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # In float64: a float32 comparison rounds the threshold to float32 as well, and a similarity
        # equal to float32(threshold) yet below the threshold itself would count as a duplicate.
        return (a @ b.T).astype(np.float64, copy=False) >= threshold

    embeddings = np.asarray(embeddings)
    keep = np.ones(len(groups), dtype=bool)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for idx in by_group.values():
        if len(idx) == 1:
            continue
        kept_rows: list[np.ndarray] = []
        for start in range(0, len(idx), block):
            cand = np.asarray(idx[start:start + block])
            rows = embeddings[cand]
            if kept_rows:
                shadowed = np.zeros(len(cand), dtype=bool)
                for earlier_kept in kept_rows:
                    shadowed |= similar(rows, earlier_kept).any(axis=1)
                keep[cand[shadowed]] = False
                cand, rows = cand[~shadowed], rows[~shadowed]
            # Pairs come in row-major order, so every earlier item is settled before a later one is looked at.
            later, earlier = np.nonzero(similar(rows, rows))
            before = earlier < later
            kept = np.ones(len(cand), dtype=bool)
            for j, i in zip(later[before].tolist(), earlier[before].tolist()):
                if kept[i]:
                    kept[j] = False
            keep[cand[~kept]] = False
            if start + block < len(idx):
                kept_rows.append(rows[kept])
    return keep


def representative_clips(curated: pd.DataFrame, described: pd.DataFrame) -> pd.DataFrame:
    """The representative clips that have a reconciled description: the ones queries are written about."""
    columns = ["clip_id", "description", "visual_label"]
    return curated[curated["is_representative"]].drop(columns=["visual_label"], errors="ignore").merge(
        described[columns], on="clip_id", how="inner"
    )


def query_requests(clips: pd.DataFrame, subs, splits: dict[str, str], q) -> list[tuple[QueryRequest, str, int]]:
    """(request, split, visual label) per clip and subcategory it is asked about."""
    out = []
    for r in clips.itertuples():
        split, visual = splits[r.clip_id], int(r.visual_label)
        pool = "train" if split == "train" else "eval"
        for s in subs:
            if s.subcategory in q.ood_subcategories and split != "heldout":
                continue
            if s.kind == "benign" and visual:  # SB only: a benign question about a dangerous clip is none of the four kinds
                continue
            language = query_language(r.clip_id, s.subcategory, q.languages)
            out.append((QueryRequest(r.clip_id, r.description, r.scene_category, intent_pool(s, pool), q.count(s.kind), pool, language),
                        split, visual))
    return out


def query_language(clip_id: str, subcategory: str, languages: Sequence[str]) -> str:
    """The language of a (clip, subcategory)'s queries: a stable hash, so every split holds every
    language and a new taxonomy version asks an unchanged subcategory in the same one."""
    h = int(hashlib.sha256(f"{clip_id}\x00{subcategory}".encode()).hexdigest()[:8], 16)
    return languages[h % len(languages)]


def candidate_frame(clips: pd.DataFrame, subs, writer, q, splits: dict[str, str]) -> pd.DataFrame:
    """One row per written query; a request the writer failed for good is one row with no query and
    its `failure` record, so it is dropped and counted, not lost."""
    from resources.roles import failure_records

    requests = query_requests(clips, subs, splits, q)
    written = writer.write([r for r, _, _ in requests])
    rows = []
    for (req, split, visual), queries, failure in zip(requests, written, failure_records(writer, len(requests))):
        textual = int(req.sub.harmful)
        for text in queries if failure is None else [""]:
            rows.append(
                {
                    "clip_id": req.clip_id,
                    "scene_category": req.scene_category,
                    "principle": req.sub.principle,
                    "category": req.sub.category,
                    "subcategory": req.sub.subcategory,
                    "kind": kind_of(textual, visual),
                    "visual_label": visual,
                    "textual_label": textual,
                    # Must be refused: a harmful question, or a contextual one about a dangerous clip.
                    "harmful": bool(textual or (req.sub.kind == "contextual" and visual)),
                    "split": split,
                    "slice": "ood" if req.sub.subcategory in q.ood_subcategories else "in",
                    "query": text.strip(),
                    "language": req.language,
                    "description": req.description,
                    "failure": failure,
                }
            )
    return pd.DataFrame(rows)


def mark_drops(candidates: pd.DataFrame, subs, adversarial_filter, q, embed) -> pd.DataFrame:
    """Each candidate's drop_reason ("" when kept): writer failed, empty, filter failed, weak (its
    adversarial strength below queries.adversarial_strength_threshold), or near duplicate; a role's
    failure is in the `failure` column, each harmful candidate's strength in `strength`."""
    from resources.roles import failure_records

    sub_by_name = {s.subcategory: s for s in subs}
    candidates = candidates.copy()
    if "failure" not in candidates:
        candidates["failure"] = None
    candidates["drop_reason"] = np.where(candidates["failure"].notna(), "writer failed", "")
    candidates.loc[(candidates["drop_reason"] == "") & (candidates["query"] == ""), "drop_reason"] = "empty"
    # SafeVid re-evaluates the adversarial questions only: a benign or contextual one reads harmless on purpose.
    harmful = candidates["subcategory"].map(lambda s: sub_by_name[s].harmful)
    asked = candidates[(candidates["drop_reason"] == "") & harmful].index
    strength = adversarial_filter.strength([(q_, sub_by_name[s]) for q_, s in zip(candidates.loc[asked, "query"], candidates.loc[asked, "subcategory"])])
    failed = failure_records(adversarial_filter, len(asked))
    candidates["strength"] = pd.array([None] * len(candidates), dtype="Int64")
    candidates.loc[asked, "strength"] = pd.array(strength, dtype="Int64")
    threshold = q.adversarial_strength_threshold
    candidates.loc[asked, "drop_reason"] = [
        "filter failed" if f else "" if v is not None and v >= threshold else "weak" for v, f in zip(strength, failed)
    ]
    candidates.loc[asked, "failure"] = failed
    live = candidates[candidates["drop_reason"] == ""].index
    # Only queries that survived the filter are embedded: the others can't shadow a kept one.
    # Per clip: the same question about two clips is two items (only the video differs).
    groups = (candidates.loc[live, "clip_id"] + "\x00" + candidates.loc[live, "subcategory"]).tolist()
    mask = near_duplicate_mask(embed(candidates.loc[live, "query"].tolist()), groups, q.near_duplicate_threshold)
    candidates.loc[live[~mask], "drop_reason"] = "near duplicate"
    return candidates


def query_failure_problems(candidates: pd.DataFrame, settings) -> list[str]:
    """The writer's and the filter's failure rates against their settings (ground.roles.failure_problems)."""
    from resources.roles import too_many_failures

    reasons = candidates["drop_reason"]
    requests = candidates[["clip_id", "subcategory"]].drop_duplicates()
    writer_failed = int((reasons == "writer failed").sum())
    filtered = int((candidates["strength"].notna() | (reasons == "filter failed")).sum()) if "strength" in candidates else 0
    return too_many_failures(settings, "query_writer", writer_failed, len(requests)) + too_many_failures(
        settings, "adversarial_filter", int((reasons == "filter failed").sum()), filtered
    )


def query_id(clip_id: str, subcategory: str, query: str) -> str:
    """What identifies an item: its clip, subcategory and text, never the taxonomy version, so an
    unchanged query keeps its id (and every choice keyed on it) in a new version; the subcategory
    tells apart one question asked under two subcategories of a clip."""
    return hashlib.sha256(f"{clip_id}\x00{subcategory}\x00{query}".encode()).hexdigest()[:16]


def query_table(candidates: pd.DataFrame, curated: pd.DataFrame) -> pd.DataFrame:
    """The kept candidates with their video and frames and a stable query_id."""
    queries = candidates[candidates["drop_reason"] == ""].drop(columns=["drop_reason", "failure"])
    queries = queries.merge(curated[["clip_id", "path", "frames_path"]].rename(columns={"path": "video_path"}), on="clip_id")
    ids = [query_id(c, s, q) for c, s, q in zip(queries["clip_id"], queries["subcategory"], queries["query"])]
    queries.insert(0, "query_id", ids)
    return queries.reset_index(drop=True)


def write_query_set(cfg, subs, curated: pd.DataFrame, described: pd.DataFrame, progress) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every candidate with its drop_reason, the kept queries) for these subcategories over the
    representative clips; `progress` reports the embedding pass."""
    from resources.embeddings import embed_texts
    from resources.roles import build_role

    clips = representative_clips(curated, described)
    splits = clip_splits(clips, cfg.queries.heldout_fraction, cfg.queries.validation_fraction, cfg.queries.seed)
    candidates = candidate_frame(clips, subs, build_role("query_writer", cfg), cfg.queries, splits)
    embed = functools.partial(embed_texts, progress=progress)
    candidates = mark_drops(candidates, subs, build_role("adversarial_filter", cfg), cfg.queries, embed)
    return candidates, query_table(candidates, curated)
