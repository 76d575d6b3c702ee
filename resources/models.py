"""The target video LLM: build the tiny embedded one, load any HF video LLM, prompt it, generate.

One code path for every model: `load_video_llm` goes through `AutoProcessor` and
`AutoModelForImageTextToText`, prompts come from the processor's own chat template
(`build_prompts` / `completion_texts`) and frames go through `processor(videos=...)`. The embedded
default is a tiny LlavaNextVideoForConditionalGeneration built from a config with a BPE tokenizer
trained on the pipeline's own text and the stock LlavaNextVideoProcessor, saved with
save_pretrained, so it loads exactly like llava-hf/LLaVA-NeXT-Video-7B-hf or a Qwen2(.5)-VL model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from resources import alarm

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
VIDEO_TOKEN, IMAGE_TOKEN = "<video>", "<image>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, VIDEO_TOKEN, IMAGE_TOKEN]

# A LLaVA-style template: "USER: <video>\n{query} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'video' %}<video>\n{% elif c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The tiny model's shape. Frames are resized to FRAME_SIZE; PATCH-sized patches, pooled 2x2 by
# LlavaNextVideo, give (FRAME_SIZE / PATCH / 2)^2 = 4 video tokens per frame.
FRAME_SIZE = 32
PATCH = 8
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=FRAME_SIZE, patch_size=PATCH, projection_dim=32)


def train_tokenizer(texts: Sequence[str], save_dir: str | Path | None = None, vocab_size: int = 800):
    """A byte-level BPE tokenizer trained on `texts`, with pad/eos/bos/unk and <video>/<image> specials.

    Returns a transformers PreTrainedTokenizerFast; saved to save_dir when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each text also with a leading space, as it follows "ASSISTANT:" in the chat template: otherwise
    # " Sure" and " Here" both start with a bare space token and every answer shares its first token.
    # The chat template's own words belong in the vocabulary too.
    texts = list(texts)
    tok.train_from_iterator(texts + [" " + t for t in texts] + ["USER: ASSISTANT:"] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        extra_special_tokens={"video_token": VIDEO_TOKEN, "image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def build_tiny_video_llm(save_dir: str | Path, texts: Sequence[str], seed: int = 0, vocab_size: int = 800):
    """Build, save (save_pretrained) and return (model, processor) of a tiny random LlavaNextVideo.

    2-layer, 64-wide Llama language model; 1-layer, 32-wide CLIP vision tower on 32x32 frames;
    the stock LlavaNextVideoProcessor with the template above. Reload with `load_video_llm(save_dir)`.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    size = {"shortest_edge": FRAME_SIZE}
    crop = {"height": FRAME_SIZE, "width": FRAME_SIZE}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        image_processor=LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]]),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS], **TINY_TEXT
        ),
        image_token_index=ids[IMAGE_TOKEN],
        video_token_index=ids[VIDEO_TOKEN],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]],
        image_seq_length=(FRAME_SIZE // PATCH) ** 2,
        video_seq_length=(FRAME_SIZE // PATCH) ** 2 // 4,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.bos_token_id = ids[BOS]
    model.save_pretrained(str(save_dir))
    processor.save_pretrained(str(save_dir))
    return model, processor


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_video_llm(name_or_path: str | Path, device: str = "auto", adapter: str | Path | None = None, trainable: bool = False):
    """(model, processor) for any HF video LLM id or saved folder, optionally with a PEFT adapter on top
    (and the alarm tokens, when the adapter folder carries them: resources/alarm.py); `trainable`
    loads the adapter to train on (the next VideoSafety-R1 stage), else it is frozen.

    The embedded model, llava-hf/LLaVA-NeXT-Video-*, Qwen2-VL and Qwen2.5-VL all load through
    AutoProcessor / AutoModelForImageTextToText. On CUDA the weights load in bfloat16.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = pick_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(str(name_or_path))
    model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), dtype=dtype)
    if alarm.carries_alarm(adapter):  # AT-SFT: the alarm tokens, embeddings and heads travel with the adapter
        alarm.load_alarm(model, processor, Path(adapter))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    model.to(device).eval()
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def _messages(query: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": query}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def build_prompts(processor, queries: Sequence[str]) -> list[str]:
    """Each query as the model's chat prompt: one video placeholder, the query, the generation prompt;
    with the alarm tokens in place when the processor has them (an AT-SFT checkpoint)."""
    if not alarm.has_alarms(processor):
        return [processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False) for q in queries]
    return [
        alarm.with_alarms(processor, processor.apply_chat_template(_messages(alarm.alarmed_query(q)), add_generation_prompt=True, tokenize=False))
        for q in queries
    ]


def completion_texts(processor, queries: Sequence[str], answers: Sequence[str]) -> list[str]:
    """What the chat template appends after the generation prompt for each answer, ending in EOS.

    Vicuna-style templates (LLaVA-NeXT-Video's among them) close the assistant turn without an EOS;
    trained on such completions a model never learns to stop, so EOS is appended where missing."""
    eos = processor.tokenizer.eos_token or ""
    out = []
    for q, a in zip(queries, answers):
        prompt = processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(_messages(q, a), tokenize=False)
        # A template that rewrites earlier turns: fall back to the answer alone.
        text = full[len(prompt):] if full.startswith(prompt) else a
        out.append(text if not eos or text.rstrip().endswith(eos) else text.rstrip() + eos)
    return out


def as_video(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) frames, as the video processors take them."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    return frames


def encode_prompts(processor, videos: Sequence[np.ndarray], queries: Sequence[str], padding_side: str = "left"):
    """Padded model inputs (input_ids, attention_mask, pixel_values_videos, ...) for a batch: left
    padding for generation; right padding for one forward pass, where positions count from 0 in
    every row as they do in training."""
    return processor(
        text=build_prompts(processor, queries),
        videos=[as_video(v) for v in videos],
        padding=True,
        padding_side=padding_side,
        add_special_tokens=False,
        return_tensors="pt",
    )


def on_model(model, batch) -> dict:
    """An encoded batch on the model's device, its float tensors in the model's dtype."""
    param = next(model.parameters())
    return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)) for k, v in batch.items()}


def generate_answers(
    model,
    processor,
    videos: Sequence[np.ndarray],
    queries: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers of the model to each (video frames, query), in batches with left padding.

    progress(done, total) is called after each batch, so a long stage can say how far it is (a
    resources.progress.ProgressReporter adds the rate and ETA)."""
    import torch

    if len(videos) != len(queries):
        raise ValueError(f"{len(videos)} videos but {len(queries)} queries")
    tok = processor.tokenizer
    answers: list[str] = []
    was_training = model.training
    model.eval()
    if progress is not None:  # the clock of the rate starts here, not at the setup before the call
        progress(0, len(queries))
    for start in range(0, len(queries), batch_size):
        batch = on_model(model, encode_prompts(processor, videos[start:start + batch_size], queries[start:start + batch_size]))
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        if progress is not None:
            progress(len(answers), len(queries))
    if was_training:
        model.train()
    return answers


def _flush_left(rows: list[list[int]], pad_id: int):
    """Right-pad lists of ids into a tensor, with the attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


def supervised_batch(processor, videos: Sequence[np.ndarray], queries: Sequence[str], answers: Sequence[str]) -> dict:
    """Model inputs for prompt + answer, labels on the answer tokens only (-100 elsewhere).

    Padding goes to the right (generation computes positions from the attention mask, so a
    right-padded batch sees the same positions as a left-padded prompt at generation time).
    """
    import torch

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = encode_prompts(processor, videos, queries)
    completions = tok(completion_texts(processor, queries, answers), add_special_tokens=False)["input_ids"]
    # Per-token type ids (Qwen2.5-VL's mm_token_type_ids) follow the ids; the answer is text (0).
    typed = [k for k in TOKEN_TYPE_KEYS if k in prompts]
    rows, label_rows, type_rows = [], [], {k: [] for k in typed}
    for i, (ids, mask, comp) in enumerate(zip(prompts["input_ids"], prompts["attention_mask"], completions)):
        keep = mask.bool()
        prompt = ids[keep].tolist()
        rows.append(prompt + list(comp))
        label_rows.append([-100] * len(prompt) + list(comp))
        for k in typed:
            type_rows[k].append(prompts[k][i][keep].tolist() + [0] * len(comp))
    input_ids, attention_mask = _flush_left(rows, pad_id)
    labels = torch.full_like(input_ids, -100)
    for i, r in enumerate(label_rows):
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    out = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", *typed)}
    out.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.update({k: _flush_left(type_rows[k], 0)[0] for k in typed})
    return out


def train_supervised(
    model,
    processor,
    videos: Sequence[np.ndarray],
    queries: Sequence[str],
    answers: Sequence[str],
    epochs: int,
    learning_rate: float,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
) -> list[float]:
    """Plain supervised LM training on the answer tokens (all weights); returns the loss per step.

    The batches are drawn once from a seeded shuffle and encoded once (the processor is the slow
    part on a CPU); each epoch visits them in a new order. progress(step, steps, loss=...) is called
    after every step (resources.progress.ProgressReporter makes it a throttled line with ETA).
    """
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(queries), generator=gen).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batches.append(supervised_batch(processor, [videos[i] for i in idx], [queries[i] for i in idx], [answers[i] for i in idx]))
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    steps_total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1 - s / max(steps_total, 1)))
    losses: list[float] = []
    model.train()
    if progress is not None:  # after the encoding: the step rate is the steps'
        progress(0, steps_total)
    for _ in range(epochs):
        for b in torch.randperm(len(batches), generator=gen).tolist():
            batch = {k: v.to(device) for k, v in batches[b].items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), steps_total, loss=losses[-1])
    model.eval()
    return losses


def answer_logprobs(model, processor, videos: Sequence[np.ndarray], queries: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """Summed log-probability of each answer given its video and query (one batch)."""
    import torch

    device = next(model.parameters()).device
    batch = supervised_batch(processor, videos, queries, answers)
    labels = batch.pop("labels").to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**batch).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).cpu().numpy()


def alarm_head_scores(model, processor, videos: Sequence[np.ndarray], queries: Sequence[str], batch_size: int = 16):
    """The alarm heads' probabilities (visual, textual) for each (video frames, query), in batches
    of prompts as generate_answers builds them, right-padded (a forward without position ids would
    shift a left-padded row's positions)."""
    visual, textual = [], []
    for start in range(0, len(queries), batch_size):
        batch = encode_prompts(processor, videos[start:start + batch_size], queries[start:start + batch_size], padding_side="right")
        v, t = alarm.head_probabilities(model, on_model(model, batch))
        visual += v.tolist()
        textual += t.tolist()
    return np.asarray(visual), np.asarray(textual)
