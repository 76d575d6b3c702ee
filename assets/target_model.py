"""target_model: the video LLM that DPO will align, and its behaviour before alignment.

`target_model.model: embedded` builds a tiny LlavaNextVideo from a config (resources/models.py)
with a tokenizer trained on the pipeline's own text, then trains it on the TRAIN split to behave
like the paper's base model (LLaVA-NeXT-Video starts at 54% safe): helpful on benign queries,
complying with most harmful ones (resources/prompts/embedded_target.yaml), refusing some with
the safe answerer's refusal. DPO re-weights answers a model already gives; a base model that never
refuses cannot be aligned in minutes (DESIGN.md). Any other value is an HF id or a local path,
loaded as is. Either way the output is data/models/<version>/target.json naming the model, which
preference_pairs and dpo_checkpoint read, and the measured base refusal rate.
"""
import hashlib
import json
import re
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import yaml

from assets.common import markdown_table, png_markdown, progress_logger, read_table, record_lineage
from assets.taxonomy import Subcategory, read_subcategories
from dagster_project.partitions import taxonomy_partitions
from dagster_project.settings import PipelineSettings
from resources.dvc import DvcTracker
from resources.roles import build_role
from resources.tracking import MlflowTracker
from resources.video import load_frames_of

TEMPLATES = Path(__file__).resolve().parent.parent / "resources" / "prompts" / "embedded_target.yaml"
CODE_VERSION = "1"
# The base model's behaviour is measured on at most this many queries per group (stable sample).
EVAL_SAMPLE = 256


def load_queries(cfg, version: str) -> pd.DataFrame:
    return read_table(cfg.path("queries", version, "queries.parquet"), "adversarial_queries")


def templates() -> dict:
    return yaml.safe_load(TEMPLATES.read_text())


def _stable(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def find_intent(query: str, intents) -> str | None:
    """The longest taxonomy intent the query contains (the offline writer puts it there verbatim)."""
    q = query.lower()
    hits = [i for i in intents if i.lower() in q]
    return max(hits, key=len) if hits else None


_ASK = re.compile(r"(?:how (?:can i|to|do i)|instructions to|tell me how to)\s+(.+?)(?:\s+without anyone noticing)?[?.!]*$", re.I)


def intent_of(query: str, intents) -> str:
    """What a harmful query asks to do: a taxonomy intent, else the text after 'how can I/how to'."""
    hit = find_intent(query, intents)
    if hit:
        return hit
    m = _ASK.search(query.strip())
    return m.group(1) if m else "do that"


def compliant_answer(intent: str, key: str, tpl: dict) -> str:
    """A compliant (unsafe) answer to a harmful request, picked by a stable hash of key."""
    text = f" {intent} "
    for word, repl in tpl.get("pronouns", {}).items():
        text = text.replace(word if word.startswith(" ") else f" {word} ", repl if repl.startswith(" ") else f" {repl} ")
    h = int(_stable(key)[:8], 16)
    form = tpl["compliant_templates"][h % len(tpl["compliant_templates"])]
    step = tpl["steps"][(h // 7) % len(tpl["steps"])]
    return form.format(intent=text.strip(), step=step)


def choose_refused(harmful: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """Groups (subcategory, behaviour key) the base model learns to refuse.

    Refusal is tied to the intent, so it is learnable and carries over to held-out queries with
    the same intent, the way a real base model refuses some requests and not others. Groups are
    taken in a seeded stable order until about `fraction` of the harmful queries are covered,
    never all groups of a subcategory, so every subcategory keeps compliant answers to learn from.
    """
    if harmful.empty or fraction <= 0:
        return set()
    sizes = harmful.groupby(["subcategory", "refusal_key"]).size()
    per_sub = harmful.groupby("subcategory")["refusal_key"].nunique().to_dict()
    taken_per_sub: dict[str, int] = {}
    total, target = len(harmful), fraction * len(harmful)
    chosen: set[str] = set()
    covered = 0
    for sub, key in sorted(sizes.index, key=lambda g: _stable(f"{seed}:{g[0]}:{g[1]}")):
        if covered >= target:
            break
        n = int(sizes[(sub, key)])
        if taken_per_sub.get(sub, 0) + 1 >= per_sub[sub] or covered + n > target + 0.05 * total:
            continue
        chosen.add(f"{sub}\x00{key}")
        taken_per_sub[sub] = taken_per_sub.get(sub, 0) + 1
        covered += n
    return chosen


def pretraining_rows(
    queries: pd.DataFrame,
    subs: list[Subcategory],
    safe_answerer,
    tpl: dict,
    refusal_fraction: float,
    over_refusal_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """What the embedded base model is trained to answer, for every TRAIN query.

    behaviour: helpful (benign query, the safe answerer's helpful answer), over_refuse (benign
    query, the refusal in embedded_target.yaml), refuse (harmful query, the safe answerer's
    refusal) or comply (harmful query, a compliant answer from embedded_target.yaml).
    """
    by_name = {s.subcategory: s for s in subs}
    train = queries[queries["split"] == "train"].copy()
    train["intent"] = [
        intent_of(q, by_name[s].intents if s in by_name else ()) if h else ""
        for q, s, h in zip(train["query"], train["subcategory"], train["harmful"])
    ]
    # Refusal is learned per intent where the query names one, else per query.
    train["refusal_key"] = [
        (find_intent(q, by_name[s].intents) if s in by_name else None) or qid
        for q, s, qid in zip(train["query"], train["subcategory"], train["query_id"])
    ]
    refused = choose_refused(train[train["harmful"]], refusal_fraction, seed)
    over_refused = choose_refused(train[~train["harmful"]], over_refusal_fraction, seed)
    safe = safe_answerer.answer(
        [(q, d, by_name[s]) for q, d, s in zip(train["query"], train["description"], train["subcategory"])]
    )
    behaviours, answers = [], []
    for row, safe_answer in zip(train.itertuples(), safe):
        if not row.harmful and f"{row.subcategory}\x00{row.refusal_key}" in over_refused:
            behaviours.append("over_refuse")
            answers.append(tpl["over_refusal"])
        elif not row.harmful:
            behaviours.append("helpful")
            answers.append(safe_answer)
        elif f"{row.subcategory}\x00{row.refusal_key}" in refused:
            behaviours.append("refuse")
            answers.append(safe_answer)
        else:
            behaviours.append("comply")
            answers.append(compliant_answer(row.intent, row.query_id, tpl))
    train["behaviour"] = behaviours
    train["answer"] = answers
    return train.reset_index(drop=True)


def tokenizer_corpus(queries: pd.DataFrame, rows: pd.DataFrame, extra: list[str]) -> list[str]:
    """The pipeline's own text: every query and description, and every answer the model learns."""
    return queries["query"].tolist() + queries["description"].drop_duplicates().tolist() + rows["answer"].tolist() + extra


def inputs_hash(rows: pd.DataFrame, corpus: list[str], settings: dict) -> str:
    """Everything the embedded model is built from: the builder's code, settings, texts and frames."""
    from resources import models

    h = hashlib.sha256()
    h.update(json.dumps({"code": CODE_VERSION, "settings": settings}, sort_keys=True, default=str).encode())
    h.update(Path(models.__file__).read_bytes())
    for text in corpus:
        h.update(text.encode() + b"\x00")
    for qid, q, a, fp in zip(rows["query_id"], rows["query"], rows["answer"], rows["frames_path"]):
        h.update(f"{qid}\x00{q}\x00{a}\x00".encode())
    for fp in sorted(set(rows["frames_path"])):
        h.update(Path(fp).read_bytes())
    return h.hexdigest()


def target_path(cfg, version: str) -> Path:
    return cfg.path("models", version, "target.json")


def read_target(cfg, version: str) -> dict:
    """{"model": HF id or local folder, "embedded": bool, ...}: what downstream stages load."""
    path = target_path(cfg, version)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize 'target_model' for partition {version} first")
    return json.loads(path.read_text())


def stable_sample(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    if len(df) <= n:
        return df
    order = sorted(df.index, key=lambda i: _stable(f"{seed}:{df.at[i, 'query_id']}"))
    return df.loc[sorted(order[:n])]


def judge_rates(judge, queries: list[str], answers: list[str], harmful: list[bool]) -> dict:
    """Safety (refusal) rate on harmful queries and helpful rate on benign ones, by the judge."""
    verdicts = judge.judge(list(zip(queries, answers, harmful)))
    harm = [v for v, h in zip(verdicts, harmful) if h]
    benign = [v for v, h in zip(verdicts, harmful) if not h]
    return {
        "refusal_rate": float(np.mean([v.safe is True for v in harm])) if harm else float("nan"),
        "helpful_rate": float(np.mean([v.helpful is True for v in benign])) if benign else float("nan"),
        "judge_failures": sum(v.safe is None for v in verdicts),
        "n_harmful": len(harm),
        "n_benign": len(benign),
        "verdicts": verdicts,
    }


def loss_plot(losses: list[float], title: str) -> str:
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


def build_embedded(cfg, queries: pd.DataFrame, subs: list[Subcategory], out_dir: Path, log) -> dict:
    """Build and pretrain the embedded base model into out_dir, unless the same inputs built it already."""
    from resources import models

    tm = cfg.target_model
    tpl = templates()
    rows = pretraining_rows(
        queries, subs, build_role("safe_answerer", cfg), tpl, tm.refusal_fraction, tm.over_refusal_fraction, tm.seed
    )
    # Every refusal and helpful answer the safe answerer can give goes into the tokenizer corpus too.
    corpus = tokenizer_corpus(queries, rows, [])
    digest = inputs_hash(rows, corpus, tm.model_dump())
    info_path = out_dir / "pretraining.json"
    if info_path.exists() and (out_dir / "config.json").exists():
        info = json.loads(info_path.read_text())
        if info.get("inputs_hash") == digest:
            log.info(f"embedded base model in {out_dir} is up to date (inputs {digest[:12]}); not rebuilt")
            return {**info, "rebuilt": False, "rows": rows}
    t0 = time.time()
    model, processor = models.build_tiny_video_llm(out_dir, corpus, seed=tm.seed, vocab_size=tm.vocab_size)
    model.to(models.pick_device(tm.device))
    losses = models.train_supervised(
        model,
        processor,
        load_frames_of(rows["frames_path"]),
        rows["query"].tolist(),
        rows["answer"].tolist(),
        epochs=tm.pretrain_epochs,
        learning_rate=tm.pretrain_learning_rate,
        batch_size=tm.batch_size,
        seed=tm.seed,
    )
    model.to("cpu").save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    rows[["query_id", "split", "subcategory", "behaviour", "answer"]].to_parquet(out_dir / "pretraining_rows.parquet", index=False)
    info = {
        "inputs_hash": digest,
        "losses": losses,
        "seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(processor.tokenizer),
        "behaviour_counts": rows["behaviour"].value_counts().to_dict(),
    }
    info_path.write_text(json.dumps(info))
    log.info(f"embedded base model pretrained in {info['seconds']} s, final loss {losses[-1]:.3f}")
    return {**info, "rebuilt": True, "rows": rows}


@dg.asset(
    deps=["adversarial_queries"],
    partitions_def=taxonomy_partitions,
    group_name="model",
    code_version=CODE_VERSION,
    check_specs=[dg.AssetCheckSpec("base_model_generates", asset="target_model", blocking=True)],
)
def target_model(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """The target video LLM before alignment (embedded: built and pretrained here), and how it behaves."""
    from resources import models

    cfg = settings.load()
    tm = cfg.target_model
    version = context.partition_key
    queries = load_queries(cfg, version)
    subs = read_subcategories(cfg, version)
    out_dir = cfg.path("models", version, "base")
    embedded = tm.model == "embedded"
    built: dict = {}
    if embedded:
        built = build_embedded(cfg, queries, subs, out_dir, context.log)
        model_ref = str(out_dir)
    else:
        model_ref = tm.model
    target = {"model": model_ref, "embedded": embedded, "taxonomy_version": version, "inputs_hash": built.get("inputs_hash")}
    path = target_path(cfg, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(target, indent=1))

    # Blocking check: the saved model reloads through the same code path as any HF model and generates.
    problems: list[str] = []
    t0 = time.time()
    model, processor = models.load_video_llm(model_ref, device=tm.device)
    groups = {
        (split, harmful): stable_sample(queries[(queries["split"] == split) & (queries["harmful"] == harmful)], EVAL_SAMPLE, tm.seed)
        for split in ("train", "heldout")
        for harmful in (True, False)
    }
    sample = pd.concat(groups.values())
    answers = models.generate_answers(
        model, processor, load_frames_of(sample["frames_path"]), sample["query"].tolist(), tm.max_new_tokens, tm.batch_size,
        progress=progress_logger(context, "base model answers"),
    )
    sample = sample.assign(answer=answers)
    gen_seconds = time.time() - t0
    empty = int(sum(not a.strip() for a in answers))
    if empty:
        problems.append(f"{empty} of {len(answers)} generated answers are empty")
    judge = build_role("judge", cfg)
    train_part = sample[sample["split"] == "train"]
    held_part = sample[sample["split"] == "heldout"]
    train_rates = judge_rates(judge, train_part["query"].tolist(), train_part["answer"].tolist(), train_part["harmful"].astype(bool).tolist())
    held_rates = judge_rates(judge, held_part["query"].tolist(), held_part["answer"].tolist(), held_part["harmful"].astype(bool).tolist())
    sample["judged_safe"] = [v.safe for v in train_rates["verdicts"] + held_rates["verdicts"]]

    if embedded:
        # The loop only closes when the judge tells the taught behaviours apart.
        rows = built["rows"]
        verdicts = judge.judge(list(zip(rows["query"], rows["answer"], rows["harmful"].astype(bool))))
        expected = {"comply": (False, None), "refuse": (True, False), "helpful": (True, True), "over_refuse": (True, False)}
        wrong = [
            b for b, v in zip(rows["behaviour"], verdicts)
            if v.safe != expected[b][0] or (expected[b][1] is not None and v.helpful != expected[b][1])
        ]
        if wrong:
            problems.append(f"the judge disagrees with {len(wrong)} taught answers: {pd.Series(wrong).value_counts().to_dict()}")
    passed = not problems
    rates = {
        "base_refusal_rate_train": round(train_rates["refusal_rate"], 4),
        "base_helpful_rate_benign_train": round(train_rates["helpful_rate"], 4),
        "base_refusal_rate_heldout": round(held_rates["refusal_rate"], 4),
        "base_helpful_rate_benign_heldout": round(held_rates["helpful_rate"], 4),
        "judge_failures": train_rates["judge_failures"] + held_rates["judge_failures"],
        "n_harmful_train": train_rates["n_harmful"],
        "n_benign_train": train_rates["n_benign"],
        "n_harmful_heldout": held_rates["n_harmful"],
        "n_benign_heldout": held_rates["n_benign"],
    }
    context.log.info(f"target model {model_ref}: {rates}")
    answers_path = cfg.path("models", version, "base_answers.parquet")
    sample[["query_id", "split", "subcategory", "harmful", "query", "answer", "judged_safe"]].to_parquet(answers_path, index=False)
    check = dg.AssetCheckResult(
        check_name="base_model_generates",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "answers_checked": len(answers),
            "empty_answers": empty,
            "base_refusal_rate_train": rates["base_refusal_rate_train"],
        },
    )
    judge_name = getattr(judge, "name", cfg.judge)
    with mlflow.run(
        context,
        cfg.profile,
        {**{f"target_model.{k}": v for k, v in tm.model_dump().items()}, "judge": judge_name},
        tags={"taxonomy_version": version},
        inputs={"adversarial_queries": cfg.path("queries", version, "queries.parquet")},
    ) as run:
        import mlflow as mlf

        for step, loss in enumerate(built.get("losses", [])):
            mlf.log_metric("pretrain_loss", loss, step=step)
        mlf.log_metrics({k: v for k, v in rates.items() if isinstance(v, (int, float)) and not np.isnan(v)})
        mlf.log_artifact(str(path))
        mlf.log_artifact(str(answers_path))
        mlf.set_tag("check.base_model_generates", str(passed))
    metadata = {
        "model": model_ref,
        "embedded": embedded,
        "path": dg.MetadataValue.path(str(path)),
        "judge": judge_name,
        **rates,
        "generation_seconds": round(gen_seconds, 1),
        "sample_answers": dg.MetadataValue.md(
            markdown_table(sample[["split", "subcategory", "query", "answer", "judged_safe"]].sample(frac=1, random_state=0), limit=12)
        ),
        "mlflow_run_id": run.info.run_id,
    }
    if embedded:
        metadata.update(
            {
                "rebuilt": built["rebuilt"],
                "inputs_hash": built["inputs_hash"][:16],
                "parameters": built["parameters"],
                "vocab_size": built["vocab_size"],
                "pretrain_seconds": built["seconds"],
                "pretrain_final_loss": round(built["losses"][-1], 4),
                "taught_behaviours": dg.MetadataValue.json(built["behaviour_counts"]),
                "pretrain_loss": dg.MetadataValue.md(loss_plot(built["losses"], "embedded base pretraining")),
            }
        )
    metadata.update(record_lineage(context, dvc, mlflow, run, "target_model"))
    return dg.MaterializeResult(metadata=metadata, check_results=[check])
