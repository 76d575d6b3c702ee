"""The 3H safety taxonomy: a versioned file, parsed and validated.

principles (helpful, honest, harmless) → categories → subcategories, each subcategory with a
definition, guidance for a safe answer, seed intents, and whether its queries are harmful or benign.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import yaml

PRINCIPLES = {"helpful", "honest", "harmless"}
# contextual: the question reads harmless and its harm depends on what the video shows.
KINDS = {"harmful", "benign", "contextual"}
SUBCATEGORY_FIELDS = {"kind", "definition", "safe_answer_guidance", "intents"}


class TaxonomyError(ValueError):
    pass


@dataclass(frozen=True)
class Subcategory:
    principle: str
    category: str
    subcategory: str
    kind: str
    definition: str
    safe_answer_guidance: str
    intents: tuple[str, ...]

    @property
    def harmful(self) -> bool:
        """The question itself is harmful (its textual label); a contextual one is not."""
        return self.kind == "harmful"

    def for_item(self, must_refuse: bool) -> "Subcategory":
        """This subcategory as a judge or safe answerer sees one item: harmful when the item must be
        refused (a harmful question, or a contextual one about a clip that shows a dangerous object)."""
        return replace(self, kind="harmful" if must_refuse else "benign")


def _need_mapping(value, where: str, file: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise TaxonomyError(f"{file}: at {where}: expected a non-empty mapping, got {type(value).__name__}")
    return value


def _need_text(value, where: str, file: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaxonomyError(f"{file}: at {where}: expected non-empty text, got {value!r}")
    return value.strip()


def parse_taxonomy(doc, file: str = "<taxonomy>") -> tuple[str, list[Subcategory]]:
    """Validate a taxonomy document; every error names the file, the path inside it and the problem."""
    doc = _need_mapping(doc, "<top>", file)
    version = _need_text(doc.get("version"), "version", file)
    principles = _need_mapping(doc.get("principles"), "principles", file)
    subs: list[Subcategory] = []
    for p_name, p in principles.items():
        where = f"principles.{p_name}"
        if p_name not in PRINCIPLES:
            raise TaxonomyError(f"{file}: at {where}: unknown principle; allowed: {sorted(PRINCIPLES)}")
        p = _need_mapping(p, where, file)
        for c_name, c in _need_mapping(p.get("categories"), f"{where}.categories", file).items():
            c_where = f"{where}.categories.{c_name}"
            c = _need_mapping(c, c_where, file)
            _need_text(c.get("definition"), f"{c_where}.definition", file)
            for s_name, s in _need_mapping(c.get("subcategories"), f"{c_where}.subcategories", file).items():
                s_where = f"{c_where}.subcategories.{s_name}"
                s = _need_mapping(s, s_where, file)
                unknown = set(s) - SUBCATEGORY_FIELDS
                if unknown:
                    raise TaxonomyError(f"{file}: at {s_where}: unknown keys {sorted(unknown)}; allowed: {sorted(SUBCATEGORY_FIELDS)}")
                kind = s.get("kind")
                if kind not in KINDS:
                    raise TaxonomyError(f"{file}: at {s_where}.kind: {kind!r} is not one of {sorted(KINDS)}")
                intents = s.get("intents")
                if not isinstance(intents, list) or not intents:
                    raise TaxonomyError(f"{file}: at {s_where}.intents: expected a non-empty list of text")
                subs.append(
                    Subcategory(
                        principle=p_name,
                        category=c_name,
                        subcategory=s_name,
                        kind=kind,
                        definition=_need_text(s.get("definition"), f"{s_where}.definition", file),
                        safe_answer_guidance=_need_text(s.get("safe_answer_guidance"), f"{s_where}.safe_answer_guidance", file),
                        intents=tuple(_need_text(t, f"{s_where}.intents[{i}]", file) for i, t in enumerate(intents)),
                    )
                )
    names = [s.subcategory for s in subs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaxonomyError(f"{file}: subcategory names must be unique across the taxonomy; repeated: {dupes}")
    return version, subs


def load_taxonomy(path: Path) -> tuple[str, list[Subcategory]]:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TaxonomyError(f"{path}: taxonomy file does not exist") from None
    except yaml.YAMLError as exc:
        raise TaxonomyError(f"{path}: not valid YAML: {exc}") from None
    version, subs = parse_taxonomy(doc, str(path))
    if version != path.stem:
        raise TaxonomyError(f"{path}: at version: {version!r} must match the file name {path.stem!r}")
    return version, subs


def taxonomy_frame(subs: list[Subcategory], version: str) -> pd.DataFrame:
    rows = [{**asdict(s), "intents": json.dumps(list(s.intents)), "taxonomy_version": version} for s in subs]
    return pd.DataFrame(rows)


def subcategories_from_frame(df: pd.DataFrame) -> list[Subcategory]:
    """The materialized taxonomy table back into Subcategory objects."""
    fields = set(Subcategory.__dataclass_fields__)
    return [
        Subcategory(**{**{k: v for k, v in r.items() if k in fields}, "intents": tuple(json.loads(r["intents"]))})
        for r in df.to_dict("records")
    ]


def judge_subcategories(subs) -> dict:
    """Subcategory by name, with each category under its own name too (external items may map to one)."""
    by_name = {}
    for s in subs:
        by_name.setdefault(s.category, s)
    return {**by_name, **{s.subcategory: s for s in subs}}


def item_subs(rows: pd.DataFrame, by_name: dict[str, Subcategory]) -> list[Subcategory]:
    """Each row's subcategory as the judge and safe answerer see it (`for_item`): harmful when the
    row (subcategory, harmful: must be refused) must be refused."""
    return [by_name[s].for_item(bool(h)) for s, h in zip(rows["subcategory"], rows["harmful"])]


def judge_items(rows: pd.DataFrame, by_name: dict[str, Subcategory], answers=None) -> list[tuple]:
    """The judge's (query, answer, item subcategory, clip description) for rows with query,
    subcategory, harmful and description; answers default to the rows' `answer` column."""
    answers = rows["answer"] if answers is None else answers
    return list(zip(rows["query"], answers, item_subs(rows, by_name), rows["description"]))
