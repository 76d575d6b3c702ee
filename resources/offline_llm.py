"""The offline backend of every LLM role: deterministic, driven by the taxonomy and the templates
in resources/prompts/. It exists so the embedded default runs anywhere; it is not the product —
point the roles at an OpenAI-compatible endpoint in pipelines.yaml for a real run.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import yaml

from ground.roles import QueryRequest
from resources.offline_judge import OfflineJudge
from resources.prefix_judge import PrefixJudge

PROMPTS = Path(__file__).parent / "prompts"
WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=None)
def _prompt(name: str) -> dict:
    return yaml.safe_load((PROMPTS / name).read_text())


def prompt_hash(name: str) -> str:
    return hashlib.sha256((PROMPTS / name).read_bytes()).hexdigest()[:12]


def short_scene(description: str, max_words: int = 14) -> str:
    """The first sentence of a description, lower-cased and trimmed, to ground a query in the clip."""
    first = re.split(r"(?<=[.!?])\s", description.strip(), maxsplit=1)[0].rstrip(".!? ")
    words = first.split()
    text = " ".join(words[:max_words])
    return text[:1].lower() + text[1:]


def _pick(key: str, n: int, k: int) -> list[int]:
    """k distinct indices of n, chosen by a stable hash so reruns write the same queries."""
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).hexdigest())
    return order[: min(k, n)]


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) > 3}


class OfflineReconciler:
    """Keeps the first describer's text and adds the sentences of describers that agree with it;
    labels the clip harmful when the merged text names a dangerous thing (offline_reconciler.yaml)."""

    def __init__(self):
        cfg = _prompt("offline_reconciler.yaml")
        self.min_overlap = cfg["min_overlap"]
        self.hazards = set(cfg["hazard_words"])

    def visual_label(self, text: str) -> int:
        return int(bool(set(WORD.findall(text.lower())) & self.hazards))

    def reconcile(self, items):
        out = []
        for descriptions in items:
            names = list(descriptions)
            anchor = descriptions[names[0]]
            anchor_words = content_words(anchor)
            agreed, text = [names[0]], [anchor.strip()]
            for name in names[1:]:
                words = content_words(descriptions[name])
                overlap = len(words & anchor_words) / max(len(words), 1)
                if overlap >= self.min_overlap:
                    agreed.append(name)
                    text += [s for s in re.split(r"(?<=[.!?])\s", descriptions[name].strip()) if s and s not in anchor]
            merged = " ".join(text)
            out.append((merged, agreed, self.visual_label(merged)))
        return out


class OfflineQueryWriter:
    """Fills the request's language's templates (offline_languages.yaml) with the subcategory's
    intents: the frame of the question is translated, the intent stays the taxonomy's English seed."""

    def write(self, requests: list[QueryRequest]) -> list[list[str]]:
        languages = _prompt("offline_languages.yaml")["languages"]
        out = []
        for r in requests:
            if r.language not in languages:
                raise ValueError(f"{r.clip_id}/{r.sub.subcategory}: the offline writer has no templates for language "
                                 f"{r.language!r} (resources/prompts/offline_languages.yaml has {sorted(languages)})")
            tpl = languages[r.language]
            templates = (tpl["harmful_templates"] if r.sub.harmful else tpl["benign_templates"])[r.pool]
            key = f"{r.clip_id}:{r.sub.subcategory}"
            queries = []
            for j, t in enumerate(_pick(key, len(templates), r.n)):
                intent = r.sub.intents[_pick(f"{key}:{j}", len(r.sub.intents), 1)[0]]
                queries.append(templates[t].format(intent=intent))
            out.append(queries)
        return out


class OfflineAdversarialFilter:
    """Scores a harmful query's adversarial strength from its frame, in any of the writer's languages
    (offline_languages.yaml `strength`): an opinion question is weak whatever its intent says, a
    request for help is strong, one that also asks for stealth, speed or steps stronger."""

    def __init__(self):
        cues = [lang["strength"] for lang in _prompt("offline_languages.yaml")["languages"].values()]
        self.scores = _prompt("offline_writer.yaml")["strength_scores"]
        self.cues = {kind: [c.lower() for lang in cues for c in lang[kind]] for kind in ("opinion", "request", "intensifiers")}

    def strength(self, items) -> list[int]:
        out = []
        for query, _sub in items:
            text = query.lower()
            found = {kind for kind, cues in self.cues.items() if any(c in text for c in cues)}
            if "opinion" in found:
                out.append(self.scores["opinion"])
            elif "request" in found:
                out.append(self.scores["intensified_request" if "intensifiers" in found else "request"])
            else:
                out.append(self.scores["mention"])
        return out


_SHOWN = re.compile(r"on the table: ([^.]+)\.", re.I)
_PLACE = re.compile(r"\bin (an? [a-z ]+? scene)\b", re.I)


def what_is_shown(description: str) -> tuple[str, str]:
    """(the object the clip shows, the place): the rendered corpus's caption says both; any other
    description gives its first sentence and "the scene"."""
    seen, place = _SHOWN.search(description), _PLACE.search(description)
    return (seen.group(1).strip() if seen else short_scene(description)), (place.group(1) if place else "the scene")


class OfflineSafeAnswerer:
    """Refuses what must be refused, answers the rest, always naming what the clip shows; the
    wording is one of several, picked by a stable hash of the query and clip."""

    def answer(self, items):
        tpl = _prompt("offline_writer.yaml")
        out = []
        for query, description, sub in items:
            seen, place = what_is_shown(description)
            h = int(hashlib.sha256(f"{query}\x00{description}".encode()).hexdigest()[:8], 16)
            if sub.harmful and sub.subcategory in tpl["hazard_refusal_subcategories"]:
                forms = tpl["hazard_refusals"]
            elif sub.harmful:
                forms = tpl["refusals"]
            else:
                forms = tpl["benign_answers"]
            out.append(forms[h % len(forms)].format(redirect=tpl["redirects"][sub.principle], seen=seen, place=place))
        return out

    def reason(self, requests):
        """What the clip shows and whether it is dangerous, whether the question asks for harm, and
        so whether the answer helps (resources/prompts/offline_writer.yaml, `reasoning`)."""
        tpl = _prompt("offline_writer.yaml")["reasoning"]
        out = []
        for r in requests:
            seen, _ = what_is_shown(r.description)
            decision = tpl["decision"]["refuse" if r.sub.harmful else "answer"]
            out.append(" ".join([tpl["visual"][int(r.visual_label)].format(seen=seen), tpl["textual"][int(r.textual_label)], decision]))
        return out


ROLE_CLASSES = {
    "reconciler": OfflineReconciler,
    "query_writer": OfflineQueryWriter,
    "adversarial_filter": OfflineAdversarialFilter,
    "safe_answerer": OfflineSafeAnswerer,
    "judge": OfflineJudge,
    "second_judge": PrefixJudge,
}


def build(role: str, backend, settings):
    """The offline stand-in for `role` (its settings block has nothing to set)."""
    return ROLE_CLASSES[role]()
