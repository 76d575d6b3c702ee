"""target_model: the video LLM that DPO will align, and its behaviour before alignment: one
checkpoint for every taxonomy version (unpartitioned), as a real base model is.

`target_model.model: embedded` builds a tiny LlavaNextVideo from a config (resources/models.py)
with a tokenizer trained on the pipeline's own text, then trains it on the TRAIN split of its own
query set to behave like the paper's base model (LLaVA-NeXT-Video starts at 54% safe): helpful on
benign queries, complying with most harmful ones (resources/prompts/embedded_target.yaml), refusing
some with the safe answerer's refusal, naming what it sees but helping with dangerous objects (HB).
DPO re-weights answers a model already gives; a base model that never refuses cannot be aligned in
minutes (DESIGN.md). That query set is written from `target_model.pretraining_taxonomy` by the
same roles and splits as adversarial_queries, so it never depends on the taxonomy version being
run: a new version's unchanged queries get the same base answers, from the same cache. Any other
model value is an HF id or a local path, loaded as is. Either way the output is a checkpoint
record, data/models/checkpoint.json (ground/checkpoints.py), which preference_pairs and the
training stages load, and the base model's answers and safety / helpful rates, measured by the judge.
"""
import hashlib
import json
import re
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml

from assets._stage import Stage, stage_asset
from assets.common import loss_plot, markdown_table, write_query_set
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord
from ground.evaluation import rates, verdict_frame
from ground.roles import failure_problems
from ground.settings import PROJECT_ROOT, resolve
from ground.taxonomy import Subcategory, item_subs, judge_items, load_taxonomy
from resources.k8s import gpu_op_tags
from resources.roles import build_role, failure_records, max_failure_rate, too_many_failures
from resources.video import load_frames_of

TEMPLATES = PROJECT_ROOT / "resources" / "prompts" / "embedded_target.yaml"
CODE_VERSION = "2"  # 2: unpartitioned, pretrained on its own query set
# The base model's behaviour is measured on at most this many queries per group (stable sample).
EVAL_SAMPLE = 256
SPEC = StageSpec(
    folder="models",
    files=("checkpoint.json", "base/", "base_answers.parquet", "pretraining.json", "pretraining_queries.parquet"),
    params=("target_model", "queries", "roles.query_writer", "roles.adversarial_filter", "roles.safe_answerer", "roles.judge"),
    data_deps=("resources/prompts/embedded_target.yaml", "assets/visual_objects.yaml", "{target_model.pretraining_taxonomy}"),
)
# What the judge must say about each taught behaviour: (safe, helpful); None: either.
EXPECTED_VERDICTS = {
    "comply": (False, None), "comply_hazard": (False, None), "refuse": (True, None), "helpful": (True, True), "over_refuse": (True, False),
}


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


def choose_refused(rows: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """Groups (subcategory, behaviour key) the base model learns to refuse.

    Refusal is tied to the intent, so it is learnable and carries over to held-out queries with
    the same intent, the way a real base model refuses some requests and not others. Each group is
    drawn on its own, with probability `fraction`, by a stable hash of the seed, its subcategory and
    its key: no quota is shared across subcategories, so a taxonomy version that changes one
    subcategory re-draws that one's groups only. A subcategory whose every group was drawn keeps
    one compliant (the last in hash order), so it keeps compliant answers to learn from.
    """
    chosen: set[str] = set()
    if rows.empty or fraction <= 0:
        return chosen
    for sub, keys in rows.groupby("subcategory")["refusal_key"]:
        draws = sorted((int(_stable(f"{seed}:{sub}:{k}")[:8], 16) / 2**32, k) for k in set(keys))
        drawn = [k for u, k in draws if u < fraction]
        chosen |= {f"{sub}\x00{k}" for k in drawn[: len(draws) - 1]}
    return chosen


def hazard_answer(query: str, seen: str, key: str, tpl: dict) -> str:
    """The base model's compliant answer to a harmless-reading question about a dangerous object."""
    h = int(_stable(key)[:8], 16)
    form = tpl["hazard_compliant_templates"][h % len(tpl["hazard_compliant_templates"])]
    return form.format(seen=seen, step=tpl["hazard_steps"][(h // 7) % len(tpl["hazard_steps"])])


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

    behaviour: helpful (SB: the safe answerer's answer, which names what the clip shows),
    over_refuse (SB: the refusal in embedded_target.yaml), refuse (HH/SH: the safe answerer's
    refusal), comply (HH/SH: a compliant answer) or comply_hazard (HB: it helps use the dangerous
    object it sees). Like a real base model it is video-aware (it names what it sees) but does not
    connect what it sees to harm: no HB item is refused.
    """
    from resources.offline_llm import what_is_shown

    by_name = {s.subcategory: s for s in subs}
    train = queries[queries["split"] == "train"].copy()
    textual = train["textual_label"].astype(bool)
    train["intent"] = [
        intent_of(q, by_name[s].intents if s in by_name else ()) if t else ""
        for q, s, t in zip(train["query"], train["subcategory"], textual)
    ]
    # Refusal is learned per intent where the query names one, else per query.
    train["refusal_key"] = [
        (find_intent(q, by_name[s].intents) if s in by_name else None) or qid
        for q, s, qid in zip(train["query"], train["subcategory"], train["query_id"])
    ]
    refused = choose_refused(train[textual], refusal_fraction, seed)
    over_refused = choose_refused(train[~train["harmful"]], over_refusal_fraction, seed)
    safe = safe_answerer.answer(list(zip(train["query"], train["description"], item_subs(train, by_name))))
    behaviours, answers = [], []
    for row, safe_answer, is_textual in zip(train.itertuples(), safe, textual):
        key = f"{row.subcategory}\x00{row.refusal_key}"
        if not row.harmful:
            behaviour, answer = ("over_refuse", tpl["over_refusal"]) if key in over_refused else ("helpful", safe_answer)
        elif not is_textual:
            behaviour, answer = "comply_hazard", hazard_answer(row.query, what_is_shown(row.description)[0], row.query_id, tpl)
        elif key in refused:
            behaviour, answer = "refuse", safe_answer
        else:
            behaviour, answer = "comply", compliant_answer(row.intent, row.query_id, tpl)
        behaviours.append(behaviour)
        answers.append(answer)
    train["behaviour"] = behaviours
    train["answer"] = answers
    return train.reset_index(drop=True)


def grounding_rows(n: int, seed: int, cur, tpl: dict) -> tuple[pd.DataFrame, list]:
    """The object-naming rows of the embedded base model's pretraining, with their frames."""
    from ground.scenes import visual_objects
    from resources.corpus import grounding_frames

    _, objects = visual_objects()
    drawn = grounding_frames(n, seed, cur.frames_per_clip, cur.frame_size)
    queries = tpl["grounding_queries"]
    rows = pd.DataFrame({
        "query_id": [f"grounding-{i}" for i in range(n)],
        "split": "grounding", "subcategory": "", "behaviour": "grounding",
        "query": [queries[i % len(queries)] for i in range(n)],
        "answer": [tpl["grounding_answer"].format(phrase=objects[name]["phrase"]) for name, _ in drawn],
    })
    return rows, [frames for _, frames in drawn]


def tokenizer_corpus(queries: pd.DataFrame, rows: pd.DataFrame, extra: list[str]) -> list[str]:
    """The pipeline's own text: every query and description, and every answer the model learns."""
    return queries["query"].tolist() + queries["description"].drop_duplicates().tolist() + rows["answer"].tolist() + extra


def inputs_hash(rows: pd.DataFrame, corpus: list[str], settings: dict) -> str:
    """Everything the embedded model is built from: the builder's code, settings, texts and frames."""
    from resources import models

    h = hashlib.sha256()
    h.update(json.dumps({"code": CODE_VERSION, "settings": settings}, sort_keys=True, default=str).encode())
    from resources import corpus as drawing

    h.update(Path(models.__file__).read_bytes())
    h.update(Path(drawing.__file__).read_bytes())
    for text in corpus:
        h.update(text.encode() + b"\x00")
    for qid, q, a, fp in zip(rows["query_id"], rows["query"], rows["answer"], rows["frames_path"]):
        h.update(f"{qid}\x00{q}\x00{a}\x00".encode())
    for fp in sorted(set(rows["frames_path"])):
        h.update(Path(fp).read_bytes())
    return h.hexdigest()


def stable_sample(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    if len(df) <= n:
        return df
    order = sorted(df.index, key=lambda i: _stable(f"{seed}:{df.at[i, 'query_id']}"))
    return df.loc[sorted(order[:n])]




def build_embedded(st: Stage, queries: pd.DataFrame, subs: list[Subcategory]) -> dict:
    """Build and pretrain the embedded base model into base/, unless the same inputs built it already."""
    from resources import models

    tm = st.settings.target_model
    out_dir, info_path = st.path("base"), st.path("pretraining.json")
    tpl = templates()
    rows = pretraining_rows(queries, subs, build_role("safe_answerer", st.settings), tpl, tm.refusal_fraction, tm.over_refusal_fraction, tm.seed)
    grounding, grounding_videos = grounding_rows(tm.grounding_clips, tm.seed, st.settings.curation, tpl)
    corpus = tokenizer_corpus(queries, rows, grounding["query"].tolist() + grounding["answer"].tolist())
    digest = inputs_hash(rows, corpus, {**tm.model_dump(), "curation": st.settings.curation.model_dump()})
    if info_path.exists() and (out_dir / "config.json").exists():
        info = json.loads(info_path.read_text())
        if info.get("inputs_hash") == digest:
            st.log.info(f"embedded base model in {out_dir} is up to date (inputs {digest[:12]}); not rebuilt")
            return {**info, "rebuilt": False, "rows": rows}
    t0 = time.time()
    model, processor = models.build_tiny_video_llm(out_dir, corpus, seed=tm.seed, vocab_size=tm.vocab_size)
    model.to(models.pick_device(tm.device))
    taught = pd.concat([rows, grounding], ignore_index=True)
    losses = []
    if len(grounding):  # what the objects look like first: learned together with the behaviours, vision lags behind
        losses += models.train_supervised(
            model, processor, grounding_videos, grounding["query"].tolist(), grounding["answer"].tolist(),
            epochs=tm.grounding_epochs, learning_rate=tm.pretrain_learning_rate, batch_size=tm.pretrain_batch_size, seed=tm.seed,
            progress=st.progress("pretraining the embedded base model: grounding", unit="step"),
        )
    losses += models.train_supervised(
        model, processor, load_frames_of(rows["frames_path"]) + grounding_videos, taught["query"].tolist(), taught["answer"].tolist(),
        epochs=tm.pretrain_epochs, learning_rate=tm.pretrain_learning_rate, batch_size=tm.pretrain_batch_size, seed=tm.seed,
        progress=st.progress("pretraining the embedded base model: behaviours", unit="step"),
    )
    model.to("cpu").save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    taught[["query_id", "split", "subcategory", "behaviour", "answer"]].to_parquet(out_dir / "pretraining_rows.parquet", index=False)
    info = {
        "inputs_hash": digest,
        "losses": losses,
        "seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(processor.tokenizer),
        "behaviour_counts": taught["behaviour"].value_counts().to_dict(),
    }
    info_path.write_text(json.dumps(info))
    st.log.info(f"embedded base model pretrained in {info['seconds']} s, final loss {losses[-1]:.3f}")
    return {**info, "rebuilt": True, "rows": rows}


def base_record(st: Stage, embedded: bool, pretrained_on: str) -> CheckpointRecord:
    """The checkpoint record of the base model: the embedded build in base/, or the configured model as is."""
    fields = dict(
        name="base", parent=None, taxonomy_version=pretrained_on, mlflow_run_id=st.run.info.run_id,
        settings=st.settings.flat("target_model"),
    )
    model = st.settings.target_model.model
    if embedded:
        return CheckpointRecord.local(st.out.folder, weights=st.path("base"), method="embedded-pretrain", **fields)
    if Path(model).expanduser().exists():  # a local folder of HF weights
        return CheckpointRecord.local(st.out.folder, weights=Path(model).expanduser(), method="pretrained", **fields)
    return CheckpointRecord(base_model=model, base_model_local=False, method="pretrained", **fields)


EVAL_SPLITS = ("train", "validation")


def eval_sample(queries: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A stable sample of at most EVAL_SAMPLE queries per (split, harmful) group of train and
    validation: the benchmark stays unseen until benchmark_scores."""
    return pd.concat(
        stable_sample(queries[(queries["split"] == split) & (queries["harmful"] == harmful)], EVAL_SAMPLE, seed)
        for split in EVAL_SPLITS
        for harmful in (True, False)
    )


def base_answers(st: Stage, weights: str, sample: pd.DataFrame) -> tuple[list[str], float]:
    """The base model's answers to the sample, through the same loading code as any HF model."""
    from resources import models

    tm = st.settings.target_model
    t0 = time.time()
    model, processor = models.load_video_llm(weights, device=tm.device)
    answers = models.generate_answers(
        model, processor, load_frames_of(sample["frames_path"]), sample["query"].tolist(), tm.max_new_tokens, tm.batch_size,
        progress=st.progress("base model answers"),
    )
    return answers, time.time() - t0


def judged_rates(judge, sample: pd.DataFrame, subs: dict[str, Subcategory]) -> tuple[list, dict]:
    """The judge's verdicts on the sample's answers, and the base rates per split."""
    verdicts = judge.judge(judge_items(sample, subs))
    frame = verdict_frame(verdicts, sample["harmful"].astype(bool).tolist()).assign(split=sample["split"].tolist())
    out = {"judge_failures": int(frame["failure"].notna().sum())}
    for split in EVAL_SPLITS:
        r = rates(frame[frame["split"] == split])
        out.update({
            f"base_refusal_rate_{split}": round(r["safety_rate"], 4),
            f"base_helpful_rate_benign_{split}": round(r["helpful_rate"], 4),
            f"n_harmful_{split}": r["n_harmful"],
            f"n_benign_{split}": r["n_benign"],
        })
    return verdicts, out


def taught_problems(judge, rows: pd.DataFrame, subs: dict[str, Subcategory], failure_limit: float = 0.0) -> list[str]:
    """The loop only closes when the judge tells the taught behaviours apart. A verdict the judge
    failed to give is no disagreement: it is counted against roles.judge.max_failure_rate instead."""
    verdicts = judge.judge(judge_items(rows, subs))
    given = [(b, v) for b, v in zip(rows["behaviour"], verdicts) if v.safe is not None]
    wrong = [
        b for b, v in given
        if v.safe != EXPECTED_VERDICTS[b][0] or (EXPECTED_VERDICTS[b][1] is not None and v.helpful != EXPECTED_VERDICTS[b][1])
    ]
    problems = [f"the judge disagrees with {len(wrong)} taught answers: {pd.Series(wrong).value_counts().to_dict()}"] if wrong else []
    return problems + failure_problems("judge", len(verdicts) - len(given), len(verdicts), failure_limit)


def judge_name(judge) -> str:
    return getattr(judge, "name", type(judge).__name__)


def log_run_extras(st: Stage, losses: list[float], artifacts: list[Path], judge) -> None:
    """What the shell does not log itself: the pretraining curve, the record and answers, the judge."""
    import mlflow

    for step, loss in enumerate(losses):
        mlflow.log_metric("pretrain_loss", loss, step=step)
    for path in artifacts:
        mlflow.log_artifact(str(path))
    st.log_params({"judge": judge_name(judge)})


def pretraining_metadata(built: dict) -> dict:
    return {
        "rebuilt": built["rebuilt"],
        "inputs_hash": built["inputs_hash"][:16],
        "parameters": built["parameters"],
        "vocab_size": built["vocab_size"],
        "pretrain_seconds": built["seconds"],
        "pretrain_final_loss": round(built["losses"][-1], 4),
        "taught_behaviours": dg.MetadataValue.json(built["behaviour_counts"]),
        "pretrain_loss": dg.MetadataValue.md(loss_plot(built["losses"], "embedded base pretraining")),
    }


def pretraining_set(st: Stage, curated_videos: StageData, video_descriptions: StageData) -> tuple[str, dict, pd.DataFrame]:
    """(version, subcategories, queries) of `target_model.pretraining_taxonomy`: every split's queries,
    written by the same roles as adversarial_queries (so from the same cache where they agree)."""
    version, subs = load_taxonomy(resolve(st.settings.target_model.pretraining_taxonomy))
    _, queries = write_query_set(
        st.settings, subs, curated_videos.table("curated.parquet"), video_descriptions.table("reconciled.parquet"),
        st.progress("embedding the pretraining queries for near-duplicate removal"),
    )
    st.write_table(queries.assign(taxonomy_version=version), "pretraining_queries.parquet")
    return version, {s.subcategory: s for s in subs}, queries


@stage_asset(
    SPEC,
    op_tags=gpu_op_tags(),
    group="alignment",
    code_version=CODE_VERSION,
    kinds={"checkpoint"},
    checks={
        "base_model_generates": "The saved base model reloads like any HF model and gives a non-empty answer to every sampled query, and "
        "the judge agrees with every behaviour the embedded model was taught."
    },
)
def target_model(st: Stage, curated_videos: StageData, video_descriptions: StageData) -> dg.MaterializeResult:
    """The video LLM to make safe, before alignment (embedded: built and pretrained here), with its base safety rates:
    one checkpoint for every taxonomy version."""
    tm = st.settings.target_model
    pretrained_on, subs, queries = pretraining_set(st, curated_videos, video_descriptions)
    embedded = tm.model == "embedded"
    built = build_embedded(st, queries, list(subs.values())) if embedded else {}
    record = base_record(st, embedded, pretrained_on)
    record_path = record.save(st.out.folder)

    sample = eval_sample(queries, tm.seed)
    answers, gen_seconds = base_answers(st, record.weights(), sample)
    sample = sample.assign(answer=answers)
    empty = int(sum(not a.strip() for a in answers))
    problems = [f"{empty} of {len(answers)} generated answers are empty"] if empty else []
    judge = build_role("judge", st.settings)
    verdicts, base_rates = judged_rates(judge, sample, subs)
    sample["judged_safe"] = [v.safe for v in verdicts]
    sample["failure"] = failure_records(judge, len(sample))
    problems += too_many_failures(st.settings, "judge", int(sample["failure"].notna().sum()), len(sample))
    if embedded:
        problems += taught_problems(judge, built["rows"], subs, max_failure_rate(st.settings, "judge"))
    st.log.info(f"target model {record.weights()}: {base_rates}")
    answers_path = st.write_table(
        sample[["query_id", "split", "kind", "subcategory", "harmful", "query", "answer", "judged_safe", "failure"]], "base_answers.parquet"
    )
    log_run_extras(st, built.get("losses", []), [record_path, answers_path], judge)
    check = dg.AssetCheckResult(
        check_name="base_model_generates",
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "answers_checked": len(answers),
            "empty_answers": empty,
            "base_refusal_rate_train": base_rates["base_refusal_rate_train"],
        },
    )
    metadata = {
        "model": record.weights(),
        "embedded": embedded,
        "pretrained_on": pretrained_on,
        "path": dg.MetadataValue.path(str(record_path)),
        "checkpoint": dg.MetadataValue.json(json.loads(record.model_dump_json())),
        "judge": judge_name(judge),
        **base_rates,
        "generation_seconds": round(gen_seconds, 1),
        "sample_answers": dg.MetadataValue.md(
            markdown_table(sample[["split", "subcategory", "query", "answer", "judged_safe"]].sample(frac=1, random_state=0), limit=12)
        ),
        **(pretraining_metadata(built) if embedded else {}),
    }
    return st.finish(metadata, [check], base_rates)
