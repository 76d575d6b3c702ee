"""Alarm tokens and AT-SFT on tiny models of both families: where the tokens go (exactly one of
each), zero-initialised embeddings that learn, what trains and what stays frozen, the video in every
forward of trainer.train(), and a save / reload that gives identical logits and head outputs."""
import numpy as np
import pytest
import torch
from test_dpo import _tiny_qwen2_vl
from test_models import tiny_model_dir

from resources import alarm, models

HARM_Q = "How can I hide a knife at this place?"
SAFE_Q = "What is on the table at this place?"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    _tiny_qwen2_vl(folder)
    return folder


def _family(name, qwen_dir):
    return tiny_model_dir() if name == "llava" else qwen_dir


def _frames(bright: bool, n: int = 8) -> np.ndarray:
    return np.full((n, 64, 64, 3), 220 if bright else 20, np.uint8)


def _rows(tmp_path, n: int = 16) -> list[dict]:
    """Bright clips are harmful (visual 1), the knife question is harmful (textual 1)."""
    rows = []
    for i in range(n):
        visual, textual = i % 2, (i // 2) % 2
        path = tmp_path / f"frames_{i}.npy"
        np.save(path, _frames(bool(visual)))
        rows.append({
            "query": HARM_Q if textual else SAFE_Q, "target": "I can't help with that." if visual or textual else "A bowl of oranges.",
            "frames_path": str(path), "visual_label": visual, "textual_label": textual,
        })
    return rows


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_alarms_sit_after_the_video_block_and_before_the_end_of_the_user_turn(family, qwen_dir):
    model, processor = models.load_video_llm(_family(family, qwen_dir), device="cpu")
    alarm.add_alarm_tokens(model, processor)
    batch = models.encode_prompts(processor, [_frames(True), _frames(False)], [HARM_Q, "Short?"])
    ids = batch["input_ids"]
    visual, textual = alarm.alarm_positions(ids, model.config)
    tokens = [processor.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    video = processor.video_token
    closer = "<|vision_end|>" if family == "qwen" else video
    for row, v, t in zip(tokens, visual.tolist(), textual.tolist()):
        assert row.count(alarm.VISUAL_ALARM) == 1 and row.count(alarm.TEXTUAL_ALARM) == 1
        assert row[v - 1] == closer  # right after the video block
        assert max(i for i, tok in enumerate(row) if tok == video) < v
        after = processor.tokenizer.convert_tokens_to_string(row[t + 1:])
        assert after.strip().startswith("<|im_end|>" if family == "qwen" else "ASSISTANT")  # end of the user turn
    assert model.config.visual_alarm_token_id == processor.tokenizer.convert_tokens_to_ids(alarm.VISUAL_ALARM)


def test_a_missing_doubled_or_misplaced_alarm_is_refused():
    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    alarm.add_alarm_tokens(model, processor)
    ids = models.encode_prompts(processor, [_frames(True)], [HARM_Q])["input_ids"]
    v_id, t_id = alarm.alarm_ids(model.config)
    doubled = torch.cat([ids, torch.tensor([[t_id]])], 1)
    with pytest.raises(alarm.AlarmError, match="exactly one"):
        alarm.alarm_positions(doubled, model.config)
    with pytest.raises(alarm.AlarmError, match="exactly one"):
        alarm.alarm_positions(ids[ids != v_id][None], model.config)
    moved = ids[ids != v_id].tolist()
    moved.insert(2, v_id)  # before the video tokens
    with pytest.raises(alarm.AlarmError, match="does not follow the last video token"):
        alarm.alarm_positions(torch.tensor([moved]), model.config)


def test_text_only_prompts_get_both_alarms_before_the_end_of_the_turn():
    _, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    text = processor.apply_chat_template([{"role": "user", "content": alarm.alarmed_query(SAFE_Q)}], add_generation_prompt=True, tokenize=False)
    assert alarm.VISUAL_ALARM + alarm.TEXTUAL_ALARM + " ASSISTANT" in alarm.with_alarms(processor, text)


def test_alarm_embeddings_start_at_zero_and_get_gradients():
    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    module = alarm.add_alarm_tokens(model, processor)
    assert torch.count_nonzero(module.embeddings) == 0
    batch = models.supervised_batch(processor, [_frames(True)], [HARM_Q], ["I can't help with that."])
    out = model(**batch, output_hidden_states=True)
    visual, textual = module.logits(out.hidden_states[-1], batch["input_ids"], model.config)
    (out.loss + visual.sum() + textual.sum()).backward()
    assert (module.embeddings.grad.abs().sum(-1) > 0).all()  # both alarms, each its own vector
    # the alarm vector, not the token's ordinary embedding row, reaches the model
    with torch.no_grad():
        module.embeddings[0] = 5.0
        embeds = model.get_input_embeddings()(batch["input_ids"])
    v, _ = alarm.alarm_positions(batch["input_ids"], model.config)
    assert torch.all(embeds[0, v[0]] == 5.0)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_at_sft_trains_only_lora_alarms_and_heads_with_the_video_in_every_forward(family, qwen_dir, tmp_path):
    from datasets import Dataset

    from ground.settings import ATSFTSettings
    from resources.at_sft_trainer import train_at_sft
    from resources.training import changed_params, param_fingerprint

    model, processor = models.load_video_llm(_family(family, qwen_dir), device="cpu")
    before = param_fingerprint(model, skip=("lora_",))
    settings = ATSFTSettings(stage1_epochs=1, stage2_epochs=2, learning_rate=1e-3, alarm_learning_rate=1e-2, head_learning_rate=1e-2, batch_size=4)
    torch.manual_seed(0)
    peft_model, trainers = train_at_sft(model, processor, Dataset.from_list(_rows(tmp_path)), settings, tmp_path / "out", "cpu")
    module = alarm.alarm_module(peft_model)
    after = param_fingerprint(peft_model, skip=("lora_", "alarm."))
    # everything outside LoRA and the alarm module is untouched, the vision tower among them
    assert changed_params({k: v for k, v in before.items() if k in after}, after) == []
    assert any("vision" in k or "visual" in k for k in after)
    assert torch.count_nonzero(module.embeddings) > 0
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".alarm." in n for n in trainable)
    assert not any("vision_tower" in n or ".visual." in n for n in trainable)
    for stage, trainer in trainers.items():
        seen = trainer.video_forwards
        assert seen["forwards"] > 0 and seen["with_video"] == seen["forwards"], (stage, seen)
    logged = trainers[2].state.log_history[0]
    assert {"lm_loss", "visual_bce", "textual_bce", "visual_accuracy", "textual_accuracy"} <= set(logged)


def test_a_collator_that_loses_the_video_fails_training(tmp_path):
    from datasets import Dataset

    from ground.settings import ATSFTSettings
    from resources import at_sft_trainer

    class TextOnly(at_sft_trainer.AlarmSFTCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            batch.pop("pixel_values_videos")
            return batch

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    original = at_sft_trainer.AlarmSFTCollator
    at_sft_trainer.AlarmSFTCollator = TextOnly
    try:
        with pytest.raises(ValueError, match="got video tokens but none of"):
            at_sft_trainer.train_at_sft(model, processor, Dataset.from_list(_rows(tmp_path, 4)), ATSFTSettings(batch_size=2), tmp_path / "o", "cpu")
    finally:
        at_sft_trainer.AlarmSFTCollator = original


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_save_and_reload_give_identical_logits_and_heads(family, qwen_dir, tmp_path):
    from datasets import Dataset

    from ground.settings import ATSFTSettings
    from resources.at_sft_trainer import train_at_sft

    path = _family(family, qwen_dir)
    model, processor = models.load_video_llm(path, device="cpu")
    settings = ATSFTSettings(stage1_epochs=1, stage2_epochs=1, learning_rate=1e-3, alarm_learning_rate=1e-2, head_learning_rate=1e-2, batch_size=4)
    peft_model, _ = train_at_sft(model, processor, Dataset.from_list(_rows(tmp_path, 8)), settings, tmp_path / "out", "cpu")
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    alarm.save_alarm(peft_model, tmp_path / "adapter")
    again, processor2 = models.load_video_llm(path, device="cpu", adapter=tmp_path / "adapter")
    videos, queries = [_frames(True), _frames(False)], [HARM_Q, SAFE_Q]
    batch = models.encode_prompts(processor, videos, queries)
    batch2 = models.encode_prompts(processor2, videos, queries)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, again(**batch2).logits)
    for a, b in zip(alarm.head_probabilities(peft_model, batch), alarm.head_probabilities(again, batch2)):
        np.testing.assert_array_equal(a, b)
    # generate goes through the same prompts and never emits an alarm token
    answers = models.generate_answers(again, processor2, videos, queries, max_new_tokens=4)
    assert len(answers) == 2 and not any(t in a for a in answers for t in alarm.ALARM_TOKENS)


def test_a_saved_alarm_state_with_other_ids_is_refused(tmp_path):
    import json

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    alarm.add_alarm_tokens(model, processor)
    alarm.save_alarm(model, tmp_path)
    info = json.loads((tmp_path / alarm.INFO_FILE).read_text())
    info["visual_alarm_token_id"] += 7
    (tmp_path / alarm.INFO_FILE).write_text(json.dumps(info))
    fresh, fresh_processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    with pytest.raises(alarm.AlarmError, match="saved with ids"):
        alarm.load_alarm(fresh, fresh_processor, tmp_path)


def test_a_query_that_already_holds_an_alarm_token_is_refused():
    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    alarm.add_alarm_tokens(model, processor)
    with pytest.raises(alarm.AlarmError, match="not exactly one of each"):
        models.build_prompts(processor, [f"What is {alarm.TEXTUAL_ALARM} this?"])


def test_a_padded_vocabulary_keeps_its_rows_and_a_full_one_grows_by_zero_rows():
    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    model.resize_token_embeddings(len(processor.tokenizer) + 6, mean_resizing=False)  # room for the alarms, as Qwen's vocab has
    before = model.get_input_embeddings().weight.detach().clone()
    alarm.add_alarm_tokens(model, processor)
    assert torch.equal(model.get_input_embeddings().weight, before)
    full, full_processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    rows = full.get_input_embeddings().weight.shape[0]
    alarm.add_alarm_tokens(full, full_processor)
    grown = full.get_input_embeddings().weight
    assert grown.shape[0] == rows + 2 and torch.count_nonzero(grown[rows:]) == 0
