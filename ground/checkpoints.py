"""Checkpoints as records: one typed record per trained or loaded model, saved beside its weights.

Every model stage (the target model, DPO, later AT-SFT, CoT, GRPO) writes a `checkpoint.json`
into its output folder; every stage that uses a model (pairs, scores, the next training method)
loads it from there and is told clearly when it is missing or malformed. Local paths are stored
relative to the record's folder, so a data folder moved or pulled from a DVC remote still loads.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

RECORD_FILE = "checkpoint.json"
# What resources/alarm.py writes beside an adapter that carries alarm tokens (AT-SFT).
ALARM_INFO_FILE = "alarm.json"


def replicate_folder(seed: int) -> str:
    """Where a trained checkpoint keeps the adapter of a replicate seed, relative to its record."""
    return f"replicates/seed{seed}"


class CheckpointError(ValueError):
    pass


class CheckpointRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="How scores and comparisons name this checkpoint: base, safevid-dpo, ...")
    method: str = Field(description="How it was made: pretrained (loaded as is), embedded-pretrain, dpo, ...")
    base_model: str = Field(description="The full weights: an HF id, or a local folder relative to the record")
    base_model_local: bool = Field(description="base_model is a local folder (else a model hub id)")
    adapter_path: str | None = Field(None, description="LoRA adapter folder relative to the record; none for full weights")
    parent: str | None = Field(None, description="Name of the checkpoint it was trained from")
    taxonomy_version: str = Field(description="Taxonomy version of the data it was trained on")
    mlflow_run_id: str | None = Field(None, description="The MLflow run that made it")
    registered_model_version: str | None = Field(None, description="MLflow registry name/version, when registered")
    settings: dict[str, Any] = Field(default_factory=dict, description="The settings it was trained with")
    seed: int | None = Field(None, description="Training seed of its adapter (or weights); none for a model loaded as is")
    replicates: dict[str, str] = Field(
        default_factory=dict,
        description="The same recipe trained with other seeds: seed → adapter folder relative to the record; scored beside it",
    )
    alarm_tokens: bool = Field(
        False,
        description="Its adapter folders also carry VideoSafety-R1's alarm tokens: their embeddings and the two safety heads",
    )
    output_format: Literal["answer", "safety_cot"] = Field(
        "answer",
        description="What it writes: a plain answer, or VideoSafety-R1's <think>…</think><answer>…</answer><vidType>…"
        "</vidType><textType>…</textType> (CoT, GRPO), whose <answer> part the judge reads",
    )
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    _folder: Path | None = PrivateAttr(None)

    @classmethod
    def local(
        cls, folder: Path, weights: Path | str, adapter: Path | None = None, replicates: dict[int, Path] | None = None, **fields
    ) -> "CheckpointRecord":
        """A record for `folder` whose weights (and adapters) are local paths, stored relative to it."""
        rel = lambda p: os.path.relpath(Path(p).resolve(), Path(folder).resolve())  # noqa: E731
        record = cls(
            base_model=rel(weights), base_model_local=True, adapter_path=rel(adapter) if adapter else None,
            replicates={str(k): rel(p) for k, p in (replicates or {}).items()}, **fields,
        )
        record._folder = Path(folder)
        return record

    @classmethod
    def adapter_on(cls, base: "CheckpointRecord", folder: Path, replicate_seeds=(), **fields) -> "CheckpointRecord":
        """A trained checkpoint in `folder`: base's weights, the adapter at folder/adapter and each
        replicate seed's at folder/replicates/seed<k> (a hub base stays a hub id)."""
        adapter, replicates = "adapter", {str(k): replicate_folder(k) for k in replicate_seeds}
        if base.base_model_local:
            folder = Path(folder)
            return cls.local(folder, weights=base.weights(), adapter=folder / adapter,
                             replicates={int(k): folder / p for k, p in replicates.items()}, **fields)
        return cls(base_model=base.base_model, base_model_local=False, adapter_path=adapter, replicates=replicates, **fields)

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RECORD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        tmp.replace(path)
        self._folder = folder
        return path

    @classmethod
    def load(cls, folder: Path) -> "CheckpointRecord":
        """The record in `folder`, validated, with its local weights and adapter checked to exist."""
        path = Path(folder) / RECORD_FILE
        if not path.exists():
            raise CheckpointError(f"{path} is missing: materialize the stage that writes this checkpoint first")
        try:
            record = cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise CheckpointError(f"{path}: not a valid checkpoint record: {exc}") from None
        record._folder = Path(folder)
        named = [("weights", record.weights() if record.base_model_local else None), ("adapter", record.adapter())]
        named += [(f"seed {k} adapter", record.replicate(int(k)).adapter()) for k in record.replicates]
        for label, p in named:
            if p is not None and not Path(p).exists():
                raise CheckpointError(f"{path}: the {label} it names ({p}) do not exist")
            if record.alarm_tokens and label != "weights" and p is not None and not (Path(p) / ALARM_INFO_FILE).exists():
                raise CheckpointError(f"{path}: the {label} ({p}) has no {ALARM_INFO_FILE}, but the record says it carries alarm tokens")
        return record

    def weights(self) -> str:
        """What load_video_llm takes: an HF id or an absolute local folder."""
        if not self.base_model_local:
            return self.base_model
        return str((self._folder / self.base_model).resolve())

    def adapter(self) -> Path | None:
        return (self._folder / self.adapter_path).resolve() if self.adapter_path else None

    def replicate(self, seed: int) -> "CheckpointRecord":
        """The record of the same recipe trained with another seed (its own adapter, same base)."""
        if str(seed) not in self.replicates:
            raise CheckpointError(f"checkpoint {self.name!r} has no replicate with seed {seed}; it has {sorted(self.replicates)}")
        record = self.model_copy(update={"adapter_path": self.replicates[str(seed)], "seed": seed, "replicates": {}})
        record._folder = self._folder
        return record

    def all_seeds(self) -> list["CheckpointRecord"]:
        """This record and its replicates, main seed first."""
        return [self] + [self.replicate(int(k)) for k in sorted(self.replicates, key=int)]

    def of_seed(self, seed: int, what: str) -> "CheckpointRecord":
        """The record of `seed` (its main seed or a replicate), for `what` to start from."""
        seeded = {int(r.seed or 0): r for r in self.all_seeds()}
        if seed not in seeded:
            raise ValueError(f"{what} seed {seed} starts from the {self.name} adapter of seed {seed}, but {self.name} has "
                             f"seeds {sorted(seeded)}: train it with that seed too, or drop the seed")
        return seeded[seed]
