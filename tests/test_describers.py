"""Describer outputs that are not clean text never reach the reconciled description, and are counted."""
import json

import dagster as dg
from stage_resources import stage_resources
import numpy as np
import pandas as pd
import pytest

from assets.curation import SPEC as CURATED
from assets.descriptions import descriptions_check, raw_frame, reconciled_frame, rejection_metadata, screen, video_descriptions
from ground.settings import Settings
from resources.describers import TinyVideoLLMDescriber, text_problem
from resources.offline_llm import OfflineReconciler

ANCHOR = "A red circle moves in a kitchen scene with a stove. On the table: a wooden spoon."
# What the tiny describer model wrote: the right words around bytes it could not decode.
GARBLED = "A red circle moves in a kitchen\ufffd\ufffd scene with a stove. Kitchen stove \ufffdx circle moves."


@pytest.mark.parametrize(
    "text, reason",
    [
        (ANCHOR, None),
        ("Une cuisine, café au lait.\n\tDeux lignes, 厨房.\r\n", None),  # non-ASCII, line ends and tabs are fine
        (GARBLED, "undecodable bytes (U+FFFD)"),
        ("a kitchen\x07 scene", "control characters"),
        ("a kitchen\x00", "control characters"),
        ("a kitchen \udc80", "control characters"),  # a lone surrogate: bytes decoded with surrogateescape
        ("ab" + "\u200b" * 5, "mostly non-printable"),
        ("  \n", "no text"),
        (None, "no text"),
    ],
)
def test_text_problem_names_why_an_output_is_not_clean_text(text, reason):
    assert text_problem(text) == reason


CURATED_TWO = pd.DataFrame({"clip_id": ["c0", "c1"], "scene_category": ["kitchen", "kitchen"], "visual_label": [0, 0]})


def test_an_output_with_undecodable_bytes_is_not_reconciled_and_is_counted():
    items = [{"visual_facts": ANCHOR, "tiny_video_llm": GARBLED}]
    # The failure itself: the word overlap lets the garbled text through.
    assert "\ufffd" in OfflineReconciler().reconcile(items)[0][0]

    per_describer = {"visual_facts": [ANCHOR, ANCHOR], "tiny_video_llm": [GARBLED, "A red circle moves in a kitchen scene."]}
    rejected = screen(per_describer)
    reconciled = reconciled_frame(CURATED_TWO, per_describer, rejected, OfflineReconciler())
    assert "\ufffd" not in reconciled.loc[0, "description"] and reconciled.loc[0, "description"] == ANCHOR
    assert json.loads(reconciled.loc[0, "agreed_describers"]) == ["visual_facts"]
    assert json.loads(reconciled.loc[0, "rejected_describers"]) == {"tiny_video_llm": "undecodable bytes (U+FFFD)"}
    assert reconciled["n_rejected"].tolist() == [1, 0]
    assert json.loads(reconciled.loc[1, "agreed_describers"]) == ["visual_facts", "tiny_video_llm"]  # clean: still used

    raw = raw_frame([{"clip_id": "c0"}, {"clip_id": "c1"}], per_describer, rejected)
    assert raw["rejected"].tolist() == ["", "", "undecodable bytes (U+FFFD)", ""]
    meta = rejection_metadata(raw)
    assert meta["describer_outputs_rejected"] == 1 and "| tiny_video_llm | undecodable bytes (U+FFFD) | 1 |" in meta["rejected_outputs"].value


class Recording:
    def __init__(self):
        self.asked = []

    def reconcile(self, items):
        self.asked += items
        return [(next(iter(d.values())), list(d)[:1], 0) for d in items]


def test_a_clip_with_no_clean_output_is_not_sent_and_fails_the_check():
    per_describer = {"visual_facts": ["", ANCHOR], "tiny_video_llm": [GARBLED, "\x1b[31m"]}
    reconciler = Recording()
    reconciled = reconciled_frame(CURATED_TWO, per_describer, screen(per_describer), reconciler)
    assert reconciler.asked == [{"visual_facts": ANCHOR}]  # the reconciler never sees a rejected output
    assert reconciled["description"].tolist() == ["", ANCHOR] and reconciled["n_rejected"].tolist() == [2, 1]
    check = descriptions_check(CURATED_TWO, reconciled, 2)
    assert check.passed is False and "1 clips whose every describer output was rejected" in check.metadata["results"].value


def test_the_stage_counts_rejected_outputs_in_its_tables_and_metadata(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "curated").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in CURATED_TWO["clip_id"]:
        np.save(data / f"{c}.npy", rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8))
    frames = [str(data / f"{c}.npy") for c in CURATED_TWO["clip_id"]]
    curated = CURATED_TWO.assign(caption="A red circle moves in a kitchen scene", frames_path=frames)
    curated.to_parquet(data / "curated" / "curated.parquet", index=False)
    monkeypatch.setattr(TinyVideoLLMDescriber, "describe", lambda self, clips: [GARBLED, "kitchen circle moves red scene"])
    cfg = Settings(data_dir=str(data), describers=["visual_facts", "tiny_video_llm"])
    result = dg.materialize(
        [dg.AssetSpec("curated_videos", metadata=CURATED.metadata()), video_descriptions],
        resources=stage_resources(cfg, tmp_path),
        instance=dg.DagsterInstance.ephemeral(),
    )
    reconciled = pd.read_parquet(data / "descriptions" / "reconciled.parquet")
    assert not reconciled["description"].str.contains("\ufffd").any()
    assert reconciled["n_rejected"].tolist() == [1, 0]
    assert pd.read_parquet(data / "descriptions" / "describers.parquet")["rejected"].tolist() == ["", "", "undecodable bytes (U+FFFD)", ""]
    meta = result.asset_materializations_for_node("video_descriptions")[0].metadata
    assert meta["describer_outputs_rejected"].value == 1 and "undecodable bytes" in meta["rejected_outputs"].value


class FailsSecond(Recording):
    """A reconciler that fails its second item for good, as the openai backend reports it."""

    def reconcile(self, items):
        from resources.llm_client import Failure

        out = super().reconcile(items)
        self.failures = [Failure(1, "#1", "role reconciler, item #1: HTTP 500 after 6 attempts", "reconciler", 6)]
        return [out[0], ("", [], None)]


def test_a_reconciler_failure_drops_the_clip_with_its_reason_instead_of_an_empty_description():
    per_describer = {"visual_facts": [ANCHOR, ANCHOR]}
    described = reconciled_frame(CURATED_TWO, per_describer, screen(per_describer), FailsSecond())
    failed, reconciled = described[described["failure"].notna()], described[described["failure"].isna()]
    assert reconciled["clip_id"].tolist() == [CURATED_TWO["clip_id"][0]] and (reconciled["description"] != "").all()
    assert "HTTP 500" in failed["failure"].iloc[0] and '"attempts": 6' in failed["failure"].iloc[0]
    assert descriptions_check(CURATED_TWO, reconciled, 1, failed, failure_limit=0.5).passed  # 1 of 2 is 50%: allowed
    blocked = descriptions_check(CURATED_TWO, reconciled, 1, failed, failure_limit=0.05)
    assert not blocked.passed and "roles.reconciler.max_failure_rate" in blocked.metadata["results"].value
