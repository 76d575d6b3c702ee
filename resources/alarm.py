"""Alarm tokens (VideoSafety-R1's AT-SFT) for any supported video LLM.

Two special tokens, `<|visual_alarm|>` right after the video's last visual token and
`<|textual_alarm|>` just before the end of the first user turn, each with one learnable,
zero-initialised embedding that replaces the ordinary token embedding at its position; two linear
heads read the final hidden state there and say whether the video, and the query, is harmful.

The tokens go into the prompt text (`with_alarms`), so every processor expands its own video
placeholder around them: LLaVA-NeXT-Video's `<video>` becomes the whole block of video tokens
with the alarm after it, Qwen2-VL / Qwen2.5-VL's alarm follows `<|vision_end|>`. The embeddings are
a forward hook on the model's input embeddings, so generate, training and the log-probability
passes all see them without a model subclass. Everything lives in one `AlarmModule` attached to
the model (`model.alarm`), saved beside a LoRA adapter as `alarm.safetensors` + `alarm.json`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ground.checkpoints import ALARM_INFO_FILE

VISUAL_ALARM, TEXTUAL_ALARM = "<|visual_alarm|>", "<|textual_alarm|>"
ALARM_TOKENS = (VISUAL_ALARM, TEXTUAL_ALARM)
# A video block may close with its own token after the last visual token (Qwen-VL's
# <|vision_end|>); the visual alarm goes after that closer.
VIDEO_CLOSERS = ("<|vision_end|>", "<|vid_end|>", "</video>")
STATE_FILE, INFO_FILE = "alarm.safetensors", ALARM_INFO_FILE


class AlarmError(ValueError):
    pass


def has_alarms(processor) -> bool:
    """The processor's tokenizer knows the alarm tokens (add_alarm_tokens ran on it)."""
    return VISUAL_ALARM in processor.tokenizer.get_added_vocab()


def video_placeholder(processor) -> str:
    return getattr(processor, "video_token", None) or "<video>"


def with_alarms(processor, prompt: str) -> str:
    """The rendered prompt with the visual alarm after the video block. The textual alarm comes
    with the query (`alarmed_query`), so it sits just before the template closes the user turn.
    A prompt without a video gets the visual alarm just before the textual one."""
    placeholder = video_placeholder(processor)
    at = prompt.rfind(placeholder)
    if at < 0:
        out = prompt.replace(TEXTUAL_ALARM, VISUAL_ALARM + TEXTUAL_ALARM, 1)
    else:
        end = at + len(placeholder)
        for closer in VIDEO_CLOSERS:
            if prompt.startswith(closer, end):
                end += len(closer)
                break
        out = prompt[:end] + VISUAL_ALARM + prompt[end:]
    counts = {t: out.count(t) for t in ALARM_TOKENS}
    if set(counts.values()) != {1}:
        raise AlarmError(f"a prompt holds {counts} alarm tokens, not exactly one of each (does the query contain one?): {out[:200]!r}")
    return out


def alarmed_query(query: str) -> str:
    return query.rstrip() + TEXTUAL_ALARM


def alarm_ids(config) -> tuple[int, int]:
    ids = getattr(config, "visual_alarm_token_id", None), getattr(config, "textual_alarm_token_id", None)
    if None in ids:
        raise AlarmError(f"{type(config).__name__} has no alarm token ids: run resources.alarm.add_alarm_tokens on the model first")
    return int(ids[0]), int(ids[1])


def alarm_positions(input_ids, config):
    """(visual, textual) positions per row, asserting exactly one of each, the visual alarm right
    after the last video token (or its block's closing token) and before the textual alarm."""
    import torch

    visual_id, textual_id = alarm_ids(config)
    video_id = getattr(config, "video_token_id", None) or getattr(config, "video_token_index", None)
    closer_id = getattr(config, "vision_end_token_id", None)
    out = []
    for which, token in (("visual", visual_id), ("textual", textual_id)):
        hits = input_ids == token
        counts = hits.sum(-1)
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            raise AlarmError(f"rows {bad[:5]} hold {counts[bad[0]].item()} {which} alarm tokens: every sample needs exactly one")
        out.append(hits.int().argmax(-1))
    visual, textual = out
    rows = torch.arange(len(input_ids), device=input_ids.device)
    if bool((visual >= textual).any()):
        raise AlarmError("the visual alarm must come before the textual alarm in every row")
    if video_id is not None:
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        is_video = input_ids == int(video_id)
        before = input_ids[rows, (visual - 1).clamp(min=0)]
        follows = (before == int(video_id)) | (before == (int(closer_id) if closer_id is not None else -1))
        late_video = (is_video & (cols[None] > visual[:, None])).any(-1)
        wrong = (is_video.any(-1) & (~follows | late_video)).nonzero().flatten().tolist()
        if wrong:
            raise AlarmError(f"rows {wrong[:5]}: the visual alarm does not follow the last video token")
    return visual, textual


@functools.lru_cache(maxsize=None)
def _alarm_module_class():
    import torch
    from torch import nn

    class AlarmModule(nn.Module):
        """The learnable part of AT-SFT: one embedding per alarm (zero at the start), one head each."""

        def __init__(self, hidden_size: int, visual_id: int, textual_id: int):
            super().__init__()
            self.embeddings = nn.Parameter(torch.zeros(2, hidden_size))
            self.visual_head = nn.Linear(hidden_size, 1)
            self.textual_head = nn.Linear(hidden_size, 1)
            self.register_buffer("token_ids", torch.tensor([visual_id, textual_id]), persistent=False)

        def replace(self, input_ids, embeds):
            """Token embeddings with each alarm's learned vector at its positions."""
            for k in range(2):
                mask = (input_ids == self.token_ids[k]).unsqueeze(-1)
                embeds = torch.where(mask, self.embeddings[k].to(embeds.dtype), embeds)
            return embeds

        def logits(self, hidden, input_ids, config):
            """(visual, textual) head logits from the final hidden states at the alarm positions."""
            visual, textual = alarm_positions(input_ids, config)
            rows = torch.arange(len(input_ids), device=hidden.device)
            h = hidden.to(self.visual_head.weight.dtype)
            return self.visual_head(h[rows, visual]).squeeze(-1), self.textual_head(h[rows, textual]).squeeze(-1)

    return AlarmModule


def alarm_module(model):
    """The AlarmModule inside a (possibly PEFT-wrapped) model, or None."""
    cls = _alarm_module_class()
    return next((m for m in model.modules() if isinstance(m, cls)), None)


def _hidden_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def add_alarm_tokens(model, processor):
    """Add the alarm tokens to the tokenizer (ids in the model config), grow the embedding tables
    when the ids do not fit (the new rows are zero: the alarm embeddings replace them on input and
    generation suppresses the tokens), attach a zero-initialised AlarmModule and hook it into the input
    embeddings. The same ids come out for the same tokenizer, so a saved alarm state reloads onto
    a fresh copy of the base. Returns the AlarmModule."""
    import torch

    if alarm_module(model) is not None:
        raise AlarmError("the model already has alarm tokens")
    tok = processor.tokenizer
    tok.add_tokens(list(ALARM_TOKENS), special_tokens=True)
    ids = [tok.convert_tokens_to_ids(t) for t in ALARM_TOKENS]
    embed = model.get_input_embeddings()
    rows = embed.weight.shape[0]
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        embed = model.get_input_embeddings()
        # Only the rows the resize made (random otherwise); rows a padded vocabulary already had
        # (Qwen's) stay as loaded, so the frozen weights are untouched.
        with torch.no_grad():
            for table in (embed, model.get_output_embeddings()):
                if table is not None:
                    table.weight[rows:] = 0
    for config in (model.config, model.config.get_text_config()):
        config.visual_alarm_token_id, config.textual_alarm_token_id = ids
    suppress = list(model.generation_config.suppress_tokens or [])
    model.generation_config.suppress_tokens = suppress + [i for i in ids if i not in suppress]
    module = _alarm_module_class()(_hidden_size(model), *ids).to(embed.weight.device)
    model.alarm = module
    embed.register_forward_hook(lambda _m, args, out: module.replace(args[0], out))
    return module


def save_alarm(model, folder: Path) -> Path:
    """alarm.safetensors (embeddings and heads) and alarm.json (token ids, hidden size) into folder."""
    from safetensors.torch import save_file

    module = alarm_module(model)
    if module is None:
        raise AlarmError("the model has no alarm tokens to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(folder / STATE_FILE))
    visual_id, textual_id = module.token_ids.tolist()
    info = {"tokens": list(ALARM_TOKENS), "visual_alarm_token_id": visual_id, "textual_alarm_token_id": textual_id,
            "hidden_size": int(module.embeddings.shape[1])}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
    return folder / STATE_FILE


def carries_alarm(folder: Path | str | None) -> bool:
    return folder is not None and (Path(folder) / INFO_FILE).exists()


def load_alarm(model, processor, folder: Path):
    """Add the alarm tokens to a freshly loaded base and restore the saved embeddings and heads."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    module = add_alarm_tokens(model, processor)
    got = module.token_ids.tolist()
    want = [info["visual_alarm_token_id"], info["textual_alarm_token_id"]]
    if got != want:
        raise AlarmError(f"{folder / INFO_FILE}: the alarm tokens were saved with ids {want} but this tokenizer gives {got}")
    state = load_file(str(folder / STATE_FILE), device=str(module.embeddings.device))
    module.load_state_dict(state)
    return module


def head_probabilities(model, batch: dict):
    """sigmoid of both heads for one encoded prompt batch: (visual, textual) numpy arrays."""
    import torch

    module = alarm_module(model)
    if module is None:
        raise AlarmError("the model has no alarm heads")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)
        visual, textual = module.logits(out.hidden_states[-1], batch["input_ids"], model.config)
    return torch.sigmoid(visual).float().cpu().numpy(), torch.sigmoid(textual).float().cpu().numpy()
