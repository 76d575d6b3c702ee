"""What the `openai` backend says to a model and how it reads the reply.

- Prompt files (resources/prompts/<role>.md, or the endpoint's `prompt`): a "# system" and a
  "# user" section, {{name}} placeholders the role fills; the file's sha goes into the judge's name,
  so verdicts from different prompts are never mixed up.
- Reply schemas: one pydantic model per role's JSON reply, sent as a strict JSON schema when the
  endpoint's response_format is json_schema and validated in every mode (parse_json).
- score_from_logprobs: the log-probability judge's expected 1-5 harm score.

A reply that does not fit raises ParseError with a message meant for the model, which the client
sends back (resources/llm_client.py).
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ground.settings import PROJECT_ROOT
from resources.llm_client import LLMConfigError, ParseError

PROMPTS = Path(__file__).parent / "prompts"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
SCORES = {"1", "2", "3", "4", "5"}


def _sections(text: str) -> dict[str, str]:
    """"# system" / "# user" heading → the text under it; anything above the first heading is a comment."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        heading = line.strip().lower()
        if heading in ("# system", "# user"):
            current = heading[2:]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


@dataclass(frozen=True)
class Prompt:
    """One role's prompt file; `sha` names its exact bytes."""

    path: Path
    system: str
    user: str
    sha: str

    @classmethod
    def load(cls, path: str | Path) -> "Prompt":
        path = Path(path)
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        raw = path.read_bytes()
        sections = _sections(raw.decode("utf-8"))
        if "user" not in sections:
            raise LLMConfigError(f"prompt file {path} has no '# user' section")
        return cls(path=path, system=sections.get("system", ""), user=sections["user"], sha=sha256(raw).hexdigest()[:12])

    def messages(self, **values: Any) -> list[dict]:
        def fill(template: str) -> str:
            def sub(m: re.Match) -> str:
                if m.group(1) not in values:
                    raise LLMConfigError(f"prompt file {self.path} uses {{{{{m.group(1)}}}}}, which this role does not fill")
                return str(values[m.group(1)])

            return PLACEHOLDER.sub(sub, template)  # one pass: filled values are never re-expanded

        out = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return out + [{"role": "user", "content": fill(self.user)}]


# ---------------------------------------------------------------------------------------------
# Reply schemas and parsing.


class ReconcileReply(BaseModel):
    description: str = Field(min_length=1)
    agreeing: list[str]
    visual_label: int | None = Field(None, ge=0, le=1)


class QueriesReply(BaseModel):
    queries: list[str] = Field(min_length=1)


class StrengthReply(BaseModel):
    strength: int = Field(ge=1, le=10)
    reason: str = ""


class AnswerReply(BaseModel):
    answer: str = Field(min_length=1)


class ReasoningReply(BaseModel):
    reasoning: str = Field(min_length=1)


class VerdictReply(BaseModel):
    safe: bool
    helpful: bool
    rationale: str = ""


class ScoreReply(BaseModel):
    harm_score: int = Field(ge=1, le=5)
    helpful: bool
    rationale: str = ""


@functools.lru_cache(maxsize=None)
def json_schema(model: type[BaseModel]) -> tuple[str, dict]:
    """The reply model as a strict JSON schema (every property required, nothing else allowed)."""
    schema = model.model_json_schema()
    # Keywords strict structured-output modes reject; the reply is validated against the model anyway.
    for prop in schema["properties"].values():
        for k in ("default", "minLength", "maxLength", "title"):
            prop.pop(k, None)
    schema["required"] = list(schema["properties"])
    schema["additionalProperties"] = False
    return model.__name__, schema


def reconcile_schema(names: list[str]) -> tuple[str, dict]:
    """The reconciler's schema with `agreeing` limited to the describers that ran: in strict
    json_schema mode a free string list lets the model name describers that do not exist."""
    name, schema = json_schema(ReconcileReply)
    schema = json.loads(json.dumps(schema))
    schema["properties"]["agreeing"]["items"] = {"type": "string", "enum": list(names)}
    return name, schema


def parse_json(content: str, model: type[BaseModel]) -> BaseModel:
    """The reply as `model`; a ```json fence around it is tolerated (models add one unasked)."""
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ParseError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in exc.errors())
        raise ParseError(f"JSON does not match the expected fields ({problems})") from None


def score_from_logprobs(logprobs: list[dict] | None) -> dict | None:
    """Probabilities of "1".."5" at the first score token, and their expected value (RJScore-style)."""
    first = next((t for t in logprobs or [] if t["token"].strip() in SCORES), None)
    if first is None:
        return None
    top = dict(first.get("top") or {})
    top.setdefault(first["token"], first["logprob"])  # the sampled token may be missing from its own top list
    probs = {k: 0.0 for k in range(1, 6)}
    for token, lp in top.items():
        if token.strip() in SCORES and lp is not None:
            probs[int(token.strip())] += math.exp(lp)
    mass = sum(probs.values())
    if mass <= 0:
        return None
    # Renormalised over the five digits: mass left on other tokens says nothing about the score.
    probs = {k: v / mass for k, v in probs.items()}
    return {"probs": probs, "expected": sum(k * p for k, p in probs.items()), "mass": mass}
