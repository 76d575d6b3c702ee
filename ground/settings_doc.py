"""The settings reference, generated from the fields' help text (docs/settings.md, the Dagster UI).

Everything here is read off the pydantic models in ground/settings.py, so the reference cannot
drift from what the loader accepts: a test compares docs/settings.md with `settings_reference()`.
Regenerate it with `python -m ground.settings_doc > docs/settings.md`.
"""
from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ground.settings import Settings

# The placeholder a key takes where several sibling fields share one backend union ("roles.<role>").
PLACEHOLDERS = {"roles": "<role>"}

HEADER = """\
# Settings reference

Every key a `pipelines.yaml` profile can set, with its type, default and meaning. Generated from the
settings models' help text (`ground/settings.py`) by `python -m ground.settings_doc > docs/settings.md`:
edit the help text there, not this file (a test fails when the two differ).

A key not listed here is refused on load, and a bad value fails with the key, the value given and
what is allowed.
"""


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    rows: list[Row]


# --- reading the models ------------------------------------------------------------------------

def _members(ann) -> list:
    """The alternatives of a union (Optional included), else [ann]."""
    if get_origin(ann) in (Union, types.UnionType):
        return list(get_args(ann))
    return [ann]


def _unwrap(ann):
    """An Annotated[...] type's underlying type."""
    while get_origin(ann) is typing.Annotated:
        ann = get_args(ann)[0]
    return ann


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _models_of(ann) -> list[type[BaseModel]]:
    return [m for m in (_unwrap(a) for a in _members(_unwrap(ann))) if _is_model(m)]


def _tag(model: type[BaseModel], discriminator: str) -> str:
    return str(get_args(model.model_fields[discriminator].annotation)[0])


def _discriminator(field: FieldInfo) -> str | None:
    if isinstance(field.discriminator, str):
        return field.discriminator
    for meta in field.metadata:
        if isinstance(getattr(meta, "discriminator", None), str):
            return meta.discriminator
    return None


def _type_name(ann) -> str:
    ann = _unwrap(ann)
    origin = get_origin(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is Literal:
        values = [str(v) for v in get_args(ann)]
        return values[0] if len(values) == 1 else "one of: " + ", ".join(values)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann))
    if origin is list:
        return f"list of {_type_name(get_args(ann)[0])}"
    if origin is dict:
        k, v = get_args(ann)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if _is_model(ann):
        return "section"
    return getattr(ann, "__name__", str(ann))


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="), ("max_length", "length <="))


def _constraints(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {_yaml(value)}")
        if getattr(meta, "pattern", None):
            out.append(f"matching `{meta.pattern}`")
    return f" ({', '.join(out)})" if out else ""


def _yaml(value) -> str:
    """A value as it would be written in pipelines.yaml (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return _yaml(value.model_dump())
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel) and _is_model(_unwrap(field.annotation)):
        return "see its section"
    return f"`{_yaml(value)}`"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _union_row(key: str, field: FieldInfo, members: list[type[BaseModel]], disc: str) -> Row:
    tags = " or ".join(_tag(m, disc) for m in members)
    return Row(key, f"section with {disc}: {tags}", _default(field), field.description or "")


def _fields(model: type[BaseModel], first: str | None = None) -> list[tuple[str, FieldInfo]]:
    """The model's fields in order, a union member's tag field first."""
    items = list(model.model_fields.items())
    return sorted(items, key=lambda item: item[0] != first)


def _sections(model: type[BaseModel], prefix: str, title: str, intro: str, first: str | None = None) -> list[Section]:
    """The section of `model` at `prefix` and, after it, those of every model below it."""
    rows: list[Row] = []
    below: list[Section] = []
    unions_done: set[tuple[type[BaseModel], ...]] = set()
    for name, field in _fields(model, first):
        key = _join(prefix, name)
        nested = _models_of(field.annotation)
        disc = _discriminator(field)
        if disc and len(nested) > 1:
            rows.append(_union_row(key, field, nested, disc))
            members = tuple(nested)
            if members in unions_done:
                continue
            unions_done.add(members)
            sharing = [n for n, f in model.model_fields.items() if _models_of(f.annotation) == nested]
            at, note = key, ""
            if len(sharing) > 1:
                placeholder = PLACEHOLDERS.get(prefix, "<name>")
                at, note = _join(prefix, placeholder), f" `{placeholder}`: {', '.join(sharing)}."
            for m in nested:
                heading = f"`{at}` with `{disc}: {_tag(m, disc)}`"
                below += _sections(m, at, heading, (m.__doc__ or "") + note, first=disc)
            continue
        type_name = _type_name(field.annotation)
        rows.append(Row(key, type_name + _constraints(field), _default(field), field.description or ""))
        if len(nested) == 1:
            below += _sections(nested[0], key, f"`{key}`", nested[0].__doc__ or "")
    return [Section(title, intro, rows), *below]


def _all_sections() -> list[Section]:
    return _sections(Settings, "", "Top level", Settings.__doc__ or "")


# --- the outputs -------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def settings_reference() -> str:
    """docs/settings.md: every settings key as markdown, one section per settings block."""
    parts = [HEADER]
    for s in _all_sections():
        parts.append(f"## {s.title}\n")
        if s.intro:
            parts.append(_cell(s.intro) + "\n")
        parts.append("| key | type | default | description |\n| --- | --- | --- | --- |")
        parts += [
            f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |" for r in s.rows
        ]
        parts.append("")
    return "\n".join(parts)


def _field_at(dotted: str) -> FieldInfo:
    """The field at a dotted key ("roles.judge", "curation.frame_size"); in a union, any member's."""
    models: list[type[BaseModel]] = [Settings]
    field = None
    for part in dotted.split("."):
        found = [m.model_fields[part] for m in models if part in m.model_fields]
        if not found:
            raise KeyError(f"no settings key {dotted!r}")
        field = found[0]
        models = _models_of(field.annotation)
    return field


def _leaves(prefix: str, models: list[type[BaseModel]], disc: str | None) -> list[tuple[str, str]]:
    """(key, description) of every key below `prefix`; a union's keys once, its tag's meanings merged."""
    out: dict[str, str] = {}
    if disc is not None and len(models) > 1:
        out[_join(prefix, disc)] = "One of: " + " ".join(m.model_fields[disc].description or _tag(m, disc) for m in models)
    for m in models:
        only = f"{disc} {_tag(m, disc)} only: " if disc is not None and len(models) > 1 else ""
        for name, field in m.model_fields.items():
            key = _join(prefix, name)
            if key in out:
                continue
            out[key] = only + (field.description or "")
            nested = _models_of(field.annotation)
            if nested:
                out.update((k, v) for k, v in _leaves(key, nested, _discriminator(field)) if k not in out)
    return list(out.items())


def describe(sections: Sequence[str]) -> list[tuple[str, str]]:
    """(dotted key, description) of each named section ("dpo", "roles.judge", "curation.frame_size")
    and of every key below it, in the models' order; an unknown key raises KeyError."""
    out: list[tuple[str, str]] = []
    for section in sections:
        field = _field_at(section)
        out.append((section, field.description or ""))
        models = _models_of(field.annotation)
        if models:
            out += _leaves(section, models, _discriminator(field))
    return out


def main() -> None:
    sys.stdout.write(settings_reference())


if __name__ == "__main__":
    main()
