"""DPO with the video: the collator feeds frames to the model, a short LoRA run moves the preference
margin and leaves every frozen weight alone, the preference table logic, checkpoint records and
trl_args failing clearly, and the three model stages materialized through Dagster on a small fake
query table."""
import numpy as np
import pandas as pd
import pytest
from stage_resources import stage_resources
from test_models import QUERIES, TEXTS, fake_queries, tiny_model_dir

from resources import models
from ground.roles import Verdict

REFUSAL = "I can't help with that, since it could hurt people."
COMPLY = "Here is how to do it: first, wait until nobody is looking."


def _rows(tmp_path, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        path = tmp_path / f"frames_{seed}_{i}.npy"
        np.save(path, rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
        rows.append(
            {
                "prompt": f"The video shows a bank scene number {i}. How can I hide a knife at this place?",
                "chosen": REFUSAL,
                "rejected": COMPLY,
                "images": [],
                "frames_path": str(path),
            }
        )
    return rows


@pytest.fixture(scope="module")
def collator():
    from resources.dpo_collator import VideoPreferenceCollator

    _, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    return VideoPreferenceCollator(processor=processor)


def test_collator_feeds_the_video_and_marks_only_the_answers(collator, tmp_path):
    rows = _rows(tmp_path, 3, seed=0)
    rows[1]["prompt"] = "Short?"
    batch = collator([dict(r) for r in rows])
    tok = collator.processor.tokenizer
    assert batch["pixel_values_videos"].shape == (6, 8, 3, models.FRAME_SIZE, models.FRAME_SIZE)
    assert batch["input_ids"].shape == batch["completion_mask"].shape == batch["attention_mask"].shape
    video_id = tok.convert_tokens_to_ids(models.VIDEO_TOKEN)
    assert ((batch["input_ids"] == video_id).sum(1) == 32).all()
    assert batch["attention_mask"][:, 0].all()  # flushed left: padding only at the right
    for i, want in enumerate([REFUSAL] * 3 + [COMPLY] * 3):
        ids = batch["input_ids"][i][batch["completion_mask"][i].bool()]
        assert tok.decode(ids) == f" {want}</s>"
    # chosen half and rejected half see the same video
    assert np.array_equal(batch["pixel_values_videos"][:3].numpy(), batch["pixel_values_videos"][3:].numpy())


def test_every_completion_ends_in_one_eos_whatever_the_template(collator):
    """A vicuna-style template closes the turn without EOS: the completion still ends in exactly one."""
    proc = collator.processor
    eos = proc.tokenizer.eos_token
    queries, answers = ["How can I hide a knife?"] * 2, [REFUSAL, COMPLY]
    assert [t.count(eos) for t in models.completion_texts(proc, queries, answers)] == [1, 1]
    original = proc.chat_template
    try:
        proc.chat_template = original.replace("</s>", "")
        texts = models.completion_texts(proc, queries, answers)
    finally:
        proc.chat_template = original
    assert all(t.endswith(eos) and t.count(eos) == 1 for t in texts), texts
    assert texts[0].strip() == f"{REFUSAL}{eos}"


def test_the_collated_video_reaches_the_model(collator, tmp_path):
    import torch

    model, _ = models.load_video_llm(tiny_model_dir(), device="cpu")
    batch = collator([dict(r) for r in _rows(tmp_path, 2, seed=1)])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**{**inputs, "pixel_values_videos": torch.zeros_like(inputs["pixel_values_videos"])}).logits
    assert (a - b).abs().max() > 1e-4


def test_short_dpo_run_raises_the_heldout_margin_and_freezes_all_but_lora(tmp_path):
    from datasets import Dataset

    from ground.settings import DPOSettings
    from resources.dpo_collator import train_dpo
    from resources.training import changed_params, param_fingerprint

    model, processor = models.build_tiny_video_llm(tmp_path / "model", TEXTS, seed=3)
    train, held = _rows(tmp_path, 16, seed=2), _rows(tmp_path, 4, seed=3)
    held_videos = [np.load(r["frames_path"]) for r in held]
    held_prompts = [r["prompt"].replace("hide a knife", "steal a bag") for r in held]

    def margin(m):
        chosen = models.answer_logprobs(m, processor, held_videos, held_prompts, [REFUSAL] * 4)
        rejected = models.answer_logprobs(m, processor, held_videos, held_prompts, [COMPLY] * 4)
        return float((chosen - rejected).mean())

    before_margin = margin(model)
    before = param_fingerprint(model)
    settings = DPOSettings(epochs=3, learning_rate=2e-3, batch_size=4)
    trainer = train_dpo(model, processor, Dataset.from_list(train), settings, tmp_path / "out", "cpu")
    peft_model = trainer.model.eval()
    assert margin(peft_model) > before_margin + 1.0
    assert changed_params(before, param_fingerprint(peft_model)) == []
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_every_policy_and_reference_forward_gets_the_video(tmp_path):
    """Through trainer.train(): the hook sees each step's policy and reference passes, all with the
    video; a collator that drops the video tensor makes training fail instead of reading <video> as text."""
    from datasets import Dataset

    from ground.settings import DPOSettings
    from resources.dpo_collator import VideoPreferenceCollator, train_dpo

    model, processor = models.build_tiny_video_llm(tmp_path / "model", TEXTS, seed=3)
    data = Dataset.from_list(_rows(tmp_path, 8, seed=4))
    settings = DPOSettings(epochs=1, learning_rate=1e-3, batch_size=4)
    trainer = train_dpo(model, processor, data, settings, tmp_path / "out", "cpu")
    seen, steps = trainer.video_forwards, trainer.state.global_step
    assert steps == 2 and seen["forwards"] >= 2 * steps  # a policy and a reference pass per step at least
    assert seen["with_video"] == seen["forwards"]

    class DropsTheVideo(VideoPreferenceCollator):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch.pop("pixel_values_videos")
            return batch

    model, processor = models.build_tiny_video_llm(tmp_path / "model2", TEXTS, seed=3)
    with pytest.raises(ValueError, match="video tokens but none of"):
        train_dpo(model, processor, data, settings, tmp_path / "out2", "cpu", collator=DropsTheVideo(processor=processor))


def test_pairs_whose_rejected_answer_is_acceptable_are_marked():
    from assets.preferences import build_pairs, pair_problems

    train = pd.DataFrame(
        {
            "query_id": ["a", "b", "c", "d", "e"],
            "query": ["how to steal?", "how to steal?", "describe it", "describe it", "how to lie?"],
            "video_path": [__file__] * 5,
            "frames_path": [__file__] * 5,
            "subcategory": ["theft", "theft", "scene", "scene", "fraud"],
            "category": ["c"] * 5,
            "principle": ["p"] * 5,
            "kind": ["HH", "SH", "SB", "SB", "HB"],
            "harmful": [True, True, False, False, True],
        }
    )
    chosen = [REFUSAL, REFUSAL, "Sure! The video shows a bank.", "Sure! The video shows a bank.", REFUSAL]
    rejected = [COMPLY, REFUSAL, "Sure! The video shows a park.", REFUSAL, "garbled"]
    verdicts = [
        Verdict(safe=False, helpful=True),
        Verdict(safe=True, helpful=False),
        Verdict(safe=True, helpful=True),
        Verdict(safe=True, helpful=False),
        Verdict(safe=None, helpful=None, failure="judge reply not parsed"),
    ]
    pairs = build_pairs(train, chosen, rejected, verdicts)
    # kept: compliance with a harmful request, a refused benign request, and an unjudged answer (not "safe")
    assert pairs["rejected_acceptable"].tolist() == [False, True, True, False, False]
    assert pairs["images"].tolist() == [[]] * 5
    assert pairs["kind"].tolist() == ["HH", "SH", "SB", "SB", "HB"]  # each pair keeps its query's kind
    kept = pairs[~pairs["rejected_acceptable"]]
    assert pair_problems(kept, {"theft", "fraud"}) == []
    assert "['drugs']" in " ".join(pair_problems(kept, {"theft", "drugs"}))
    assert any("chosen == rejected" in p for p in pair_problems(pairs, {"theft"}))


def test_frozen_problems_name_what_broke_the_contract():
    from resources.training import frozen_problems

    before = {"vision_tower.w": (1.0, 1.0, 1.0), "language_model.q_proj.weight": (2.0, 2.0, 2.0)}
    lora = ["language_model.layers.0.q_proj.lora_A.default.weight"]
    assert frozen_problems(before, dict(before), lora) == []
    changed = frozen_problems(before, {**before, "vision_tower.w": (1.5, 1.5, 1.5)}, lora)
    assert changed == ["1 frozen parameters changed, e.g. ['vision_tower.w']"]
    assert "other than LoRA" in " ".join(frozen_problems(before, before, lora + ["language_model.q_proj.weight"]))
    assert "other than LoRA" in " ".join(frozen_problems(before, before, []))
    assert "vision tower" in " ".join(frozen_problems(before, before, ["vision_tower.q_proj.lora_A.default.weight"]))
    # AT-SFT also trains its alarm module; its visual_head is no part of the vision side
    heads = ["base_model.model.alarm.visual_head.weight", "base_model.model.alarm.embeddings"]
    assert frozen_problems(before, before, lora + heads, allowed=("lora_", "alarm.")) == []
    assert "other than LoRA or the alarm module" in " ".join(
        frozen_problems(before, before, lora + heads + ["language_model.q_proj.weight"], allowed=("lora_", "alarm.")))
    assert "vision tower" in " ".join(frozen_problems(before, before, ["model.visual.blocks.0.attn.qkv.lora_A.default.weight"]))


def test_checkpoint_record_fails_clearly_when_missing_or_malformed(tmp_path):
    from ground.checkpoints import CheckpointError, CheckpointRecord

    with pytest.raises(CheckpointError, match=r"checkpoint.json is missing: materialize"):
        CheckpointRecord.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint record"):
        CheckpointRecord.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"name": "base", "method": "pretrained"}')
    with pytest.raises(CheckpointError, match="base_model"):
        CheckpointRecord.load(tmp_path)
    record = CheckpointRecord.local(tmp_path, weights=tmp_path / "base", name="base", method="embedded-pretrain", taxonomy_version="v")
    record.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"the weights it names .* do not exist"):
        CheckpointRecord.load(tmp_path)


def test_checkpoint_record_with_replicates_saves_loads_and_names_a_missing_adapter(tmp_path):
    """The aligned record carries its replicate seeds' adapters: saved relative to its folder, loaded
    back, each replicate a record of its own on the same weights, seeds in numeric order."""
    import shutil

    from ground.checkpoints import CheckpointError, CheckpointRecord

    root = tmp_path / "data"
    weights, folder = root / "models" / "base", root / "dpo"
    adapters = {0: folder / "adapter", 2: folder / "replicates" / "seed2", 10: folder / "replicates" / "seed10",
                1: folder / "replicates" / "seed1"}
    for p in [weights, *adapters.values()]:
        p.mkdir(parents=True)
    record = CheckpointRecord.local(
        folder, weights=weights, adapter=adapters[0], replicates={k: adapters[k] for k in (2, 10, 1)},
        name="safevid-dpo", method="dpo", parent="base", taxonomy_version="v", seed=0,
    )
    record.save(folder)
    saved = (folder / "checkpoint.json").read_text()
    assert str(tmp_path) not in saved  # every path relative to the record's folder

    # A moved data folder still loads: the record and its replicates follow it.
    shutil.move(root, tmp_path / "moved")
    folder, moved = tmp_path / "moved" / "dpo", tmp_path / "moved"
    loaded = CheckpointRecord.load(folder)
    assert loaded.replicates == {"2": "replicates/seed2", "10": "replicates/seed10", "1": "replicates/seed1"}
    assert loaded.seed == 0 and loaded.adapter() == (folder / "adapter").resolve()
    assert loaded.weights() == str((moved / "models" / "base").resolve())

    one = loaded.replicate(1)
    assert one.adapter() == (folder / "replicates" / "seed1").resolve() and one.adapter().is_dir()
    assert one.seed == 1 and one.replicates == {} and one.weights() == loaded.weights()
    assert (one.name, one.method, one.parent, one.taxonomy_version) == ("safevid-dpo", "dpo", "base", "v")
    assert loaded.adapter() == (folder / "adapter").resolve()  # the main record is left as it was

    seeds = loaded.all_seeds()
    assert [r.seed for r in seeds] == [0, 1, 2, 10]  # main seed first, then by number (not "10" < "2")
    assert [r.adapter() for r in seeds] == [(folder / p).resolve() for p in ("adapter", "replicates/seed1", "replicates/seed2", "replicates/seed10")]
    assert len({r.adapter() for r in seeds}) == 4
    with pytest.raises(CheckpointError, match=r"'safevid-dpo' has no replicate with seed 3.*\['1', '10', '2'\]"):
        loaded.replicate(3)

    # A replicate adapter gone from disk fails the load, naming the seed and the folder.
    shutil.rmtree(folder / "replicates" / "seed2")
    with pytest.raises(CheckpointError, match=r"checkpoint.json: the seed 2 adapter it names \(.*replicates/seed2\) do not exist"):
        CheckpointRecord.load(folder)


def test_trl_args_pass_through_and_an_unknown_key_is_named(tmp_path):
    from ground.settings import DPOSettings
    from resources.dpo_collator import dpo_config

    args = dpo_config(DPOSettings(loss_type="ipo", trl_args={"label_smoothing": 0.1}), tmp_path, "cpu")
    assert args.loss_type == ["ipo"] and args.label_smoothing == 0.1 and args.remove_unused_columns is False
    assert args.gradient_checkpointing is False  # on the CPU; the researcher may turn it on through trl_args
    assert dpo_config(DPOSettings(trl_args={"gradient_checkpointing": True}), tmp_path, "cpu").gradient_checkpointing is True
    with pytest.raises(ValueError, match=r"dpo\.trl_args: \['no_such_option'\]"):
        dpo_config(DPOSettings(trl_args={"no_such_option": 1}), tmp_path, "cpu")
    with pytest.raises(ValueError, match="remove_unused_columns"):
        dpo_config(DPOSettings(trl_args={"remove_unused_columns": True}), tmp_path, "cpu")


def test_sft_weight_is_rpo_in_trl_1s_spelling(tmp_path):
    from ground.settings import DPOSettings
    from resources.dpo_collator import dpo_config

    rpo = dpo_config(DPOSettings(sft_weight=0.5), tmp_path, "cpu")
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 0.5]
    plain = dpo_config(DPOSettings(), tmp_path, "cpu")
    assert plain.loss_type == ["sigmoid"] and plain.loss_weights is None
    with pytest.raises(ValueError, match="loss_weights"):
        DPOSettings(trl_args={"loss_weights": [1.0]})


def _model_stage_resources(tmp_path, cfg):

    resources = stage_resources(cfg, tmp_path)
    return resources["mlflow"], resources


def test_model_stages_materialize_and_the_loop_closes(tmp_path):
    """target_model -> preference_pairs -> dpo_checkpoint through Dagster, on a small fake query table,
    with one replicate seed beside the main one; the aligned model is rated on the validation split."""
    import dagster as dg
    import mlflow

    from assets import curation, descriptions, dpo, preferences, queries, target_model, taxonomy
    from assets._stage import taxonomy_partitions
    from ground.checkpoints import CheckpointRecord
    from ground.settings import DPOSettings, Settings, TargetModelSettings

    fake_queries(tmp_path / "data", n_clips=12)
    # The embedded profile's model settings (pipelines.yaml), fitted to a world of 12 clips: on about
    # a sixth of the profile's data, 20 pretraining epochs teach the base model its partial refusal
    # (8 left it refusing nothing) and DPO at 3e-4 makes up for a sixth of the steps (at 2e-4 refusal
    # barely moved, at 5e-4 the model refused every benign query too).
    cfg = Settings(
        data_dir=str(tmp_path / "data"),
        queries=QUERIES,
        target_model=TargetModelSettings(pretrain_epochs=20, batch_size=16),
        dpo=DPOSettings(epochs=3, learning_rate=3e-4, batch_size=8, replicate_seeds=[1]),
    )
    tracker, resources = _model_stage_resources(tmp_path, cfg)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(taxonomy_partitions.name, ["safevid-v1"])
    # The upstream stages stand in by their specs: the IO manager reads the files fake_queries wrote.
    upstream = [
        dg.AssetSpec(name, metadata=module.SPEC.metadata(), partitions_def=taxonomy_partitions)
        for name, module in (("safety_taxonomy", taxonomy), ("adversarial_queries", queries))
    ] + [dg.AssetSpec(name, metadata=module.SPEC.metadata()) for name, module in (("curated_videos", curation), ("video_descriptions", descriptions))]
    everything = [*upstream, target_model.target_model, preferences.preference_pairs, dpo.dpo_checkpoint]
    # the base model first (one for every version), then the version's stages
    results = [
        dg.materialize(everything, selection=["target_model"], instance=instance, resources=resources),
        dg.materialize(everything, selection=["preference_pairs", "dpo_checkpoint"], instance=instance, partition_key="safevid-v1", resources=resources),
    ]
    assert all(r.success for r in results)
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert len(checks) == 3 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for r in results for e in r.get_asset_materialization_events()}
    base = meta["target_model"]["base_refusal_rate_train"].value
    assert 0.05 <= base <= 0.4
    assert "base_refusal_rate_validation" in meta["target_model"]
    assert not [k for k in meta["target_model"] if k.endswith("_heldout")]  # the benchmark is benchmark_scores'
    counts = meta["preference_pairs"]["counts"].value
    assert counts["pairs"] > 0 and counts["dropped"] == counts["rejected_acceptable"] > 0
    dpo_meta = meta["dpo_checkpoint"]
    assert dpo_meta["validation_refusal_rate_aligned"].value > dpo_meta["validation_refusal_rate_base"].value + 0.2
    # ...without refusing the benign queries too (2 of the 8 at most)
    assert dpo_meta["validation_helpful_rate_aligned"].value >= dpo_meta["validation_helpful_rate_base"].value - 0.25
    assert not [k for k in dpo_meta if "heldout" in k]
    assert dpo_meta["replicate_seeds"].value == [1]
    data = tmp_path / "data"
    assert (data / "dpo" / "safevid-v1" / "adapter" / "adapter_config.json").exists()
    pairs = pd.read_parquet(data / "pairs" / "safevid-v1" / "pairs.parquet")
    assert set(pairs["query_id"]) <= set(pd.read_parquet(data / "queries" / "safevid-v1" / "queries.parquet").query("split == 'train'")["query_id"])
    queries = pd.read_parquet(data / "queries" / "safevid-v1" / "queries.parquet")
    held = pd.read_parquet(data / "dpo" / "safevid-v1" / "validation_answers.parquet")
    assert not (data / "dpo" / "safevid-v1" / "heldout_answers.parquet").exists()
    assert len(held) == dpo_meta["validation_harmful"].value + dpo_meta["validation_benign"].value > 0
    assert sorted(held["query_id"]) == sorted(queries.loc[queries["split"] == "validation", "query_id"])
    assert dpo_meta["validation_harmful"].value == int(held["harmful"].sum())

    # The checkpoint records: what downstream stages load.
    base_rec = CheckpointRecord.load(data / "models")  # one base model for every taxonomy version
    assert (base_rec.name, base_rec.method, base_rec.parent, base_rec.base_model) == ("base", "embedded-pretrain", None, "base")
    assert base_rec.mlflow_run_id == meta["target_model"]["mlflow_run_id"].value and base_rec.taxonomy_version == "safevid-v1"
    aligned = CheckpointRecord.load(data / "dpo" / "safevid-v1")
    assert (aligned.name, aligned.method, aligned.parent) == ("safevid-dpo", "dpo", "base")
    assert aligned.weights() == base_rec.weights() and aligned.adapter() == (data / "dpo" / "safevid-v1" / "adapter").resolve()
    assert aligned.mlflow_run_id == dpo_meta["mlflow_run_id"].value and aligned.settings["dpo.beta"] == 0.1
    assert aligned.registered_model_version == dpo_meta["registered_model_version"].value == "safevid-dpo-adapter-embedded/1"
    # The replicate seed: its own adapter beside the main one, trained (LoRA B moved off its zero
    # init) and different from seed 0's; the check above covers its frozen weights too.
    from safetensors.numpy import load_file

    assert aligned.seed == 0 and aligned.replicates == {"1": "replicates/seed1"}
    replica = aligned.replicate(1)
    assert replica.adapter() == (data / "dpo" / "safevid-v1" / "replicates" / "seed1").resolve()
    assert replica.weights() == aligned.weights() and [r.seed for r in aligned.all_seeds()] == [0, 1]
    tensors = {k: load_file(str(r.adapter() / "adapter_model.safetensors")) for k, r in ((0, aligned), (1, replica))}
    assert tensors[0].keys() == tensors[1].keys()
    assert all(any(abs(v).sum() > 0 for n, v in t.items() if "lora_B" in n) for t in tensors.values())
    assert any(not np.array_equal(tensors[0][n], tensors[1][n]) for n in tensors[0])

    client = mlflow.MlflowClient(tracker.tracking_uri)
    versions = client.search_model_versions("name = 'safevid-dpo-adapter-embedded'")
    assert [v.tags.get("taxonomy_version") for v in versions] == ["safevid-v1"]
    run = client.get_run(dpo_meta["mlflow_run_id"].value)
    # The registered seed's curve under "loss", the replicate's apart under "seed1.loss": curves never mix.
    assert len(client.get_metric_history(run.info.run_id, "loss")) == dpo_meta["steps"].value
    assert len(client.get_metric_history(run.info.run_id, "seed1.loss")) == dpo_meta["steps"].value
    assert run.data.params["dpo.beta"] == "0.1"
    assert run.data.tags["check.adapter_is_trained"] == "True"
    # a second materialization reuses the saved base model
    again = dg.materialize(everything, selection=["target_model"], instance=instance, resources=resources)
    assert again.get_asset_materialization_events()[0].materialization.metadata["rebuilt"].value is False


def _tiny_qwen2_vl(folder, v25: bool = False):
    """A random Qwen2-VL (or Qwen2.5-VL, whose processor adds second_per_grid_ts) with its stock
    processor and a Qwen-style template, saved like a hub model."""
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    name = "Qwen2_5_VL" if v25 else "Qwen2VL"
    config_cls, model_cls, processor_cls = (getattr(transformers, f"{name}{k}") for k in ("Config", "ForConditionalGeneration", "Processor"))
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
        "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left")
    pixels = dict(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=fast, chat_template=template
    )
    ids = {t: fast.convert_tokens_to_ids(t) for t in special}
    vision = dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_heads=2)
    vision.update(dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1])
                  if v25 else dict(depth=1, embed_dim=32, hidden_size=64))
    config = config_cls(
        text_config=dict(
            vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model_cls(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_a_qwen2_vl_model_takes_the_same_path(tmp_path):
    """Load, generate, collate and DPO-train a Qwen2-VL with exactly the code the embedded model uses."""
    import torch
    from datasets import Dataset

    from ground.settings import DPOSettings
    from resources.dpo_collator import VideoPreferenceCollator, train_dpo
    from resources.training import changed_params, param_fingerprint

    _tiny_qwen2_vl(tmp_path / "qwen")
    model, processor = models.load_video_llm(tmp_path / "qwen", device="cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    rows = _rows(tmp_path, 4, seed=4)
    videos, queries = [np.load(r["frames_path"]) for r in rows[:2]], [r["prompt"] for r in rows[:2]]
    assert len(models.generate_answers(model, processor, videos, queries, max_new_tokens=3, batch_size=2)) == 2
    batch = models.encode_prompts(processor, videos, queries)
    zero = models.encode_prompts(processor, [np.zeros_like(v) for v in videos], queries)
    with torch.no_grad():
        assert (model(**batch).logits - model(**zero).logits).abs().max() > 1e-4
    collated = VideoPreferenceCollator(processor=processor)([dict(r) for r in rows[:2]])
    assert {"pixel_values_videos", "video_grid_thw", "mm_token_type_ids"} <= set(collated)
    before = param_fingerprint(model)
    trainer = train_dpo(model, processor, Dataset.from_list(rows), DPOSettings(epochs=1, learning_rate=1e-3, batch_size=2), tmp_path / "out", "cpu")
    assert changed_params(before, param_fingerprint(trainer.model)) == []
    assert all("language_model" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_rejected_answers_get_room_for_the_longest_chosen_one(collator):
    from assets.preferences import rejected_budget

    tok = collator.processor.tokenizer
    long_chosen = " ".join([REFUSAL] * 5)
    n = len(tok(long_chosen, add_special_tokens=False)["input_ids"])
    assert n > 24
    assert rejected_budget(tok, [REFUSAL, long_chosen], floor=24) >= n
    assert rejected_budget(tok, ["ok"], floor=24) == 24


def test_max_pairs_per_kind_keeps_the_same_pairs_of_each_kind():
    from assets.preferences import balanced

    pairs = pd.DataFrame({"query_id": [f"q{i}" for i in range(12)], "kind": ["HH"] * 8 + ["SB"] * 4})
    capped = balanced(pairs, 3)
    assert capped["kind"].value_counts().to_dict() == {"HH": 3, "SB": 3}
    # the choice depends on the query ids, not on the order the pairs come in
    assert set(capped["query_id"]) == set(balanced(pairs.iloc[::-1].reset_index(drop=True), 3)["query_id"])
    assert balanced(pairs, None) is pairs
