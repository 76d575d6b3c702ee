"""One DPO step and one GRPO step of a LLaVA-NeXT-Video with random weights, beside TRL's stock
DPOTrainer on the same batch: step time, peak memory, tokens/s and MFU, in one run.

    .venv/bin/python -m benchmarks.gpu_step --size 7b --steps 3 --out gpu.json   # a GPU machine, bf16
    .venv/bin/python -m benchmarks.gpu_step --size cpu --steps 2                  # the tiny variant, float32

Rows, each on a fresh model built from the same config and seed (same weights):
- project DPO: resources/dpo_collator.train_dpo, the video collator + TRL's DPOTrainer, LoRA on the
  language model, vision frozen; every forward gets the clip's pixel_values_videos;
- stock DPO: TRL's DPOTrainer with its own collator on the same pairs (clip path in a `video`
  column): stock TRL tokenizes the text and never loads the clip (trl#4002), so this row is
  text-only, the way stock TRL trains a VLM given a video dataset;
- project GRPO: resources/grpo_trainer.train_grpo (VideoGRPOTrainer), sampling and scoring included.

A step is the Trainer's on_step_begin .. on_step_end (forward, backward, optimizer; for GRPO the
generation and the rewards too); the collator runs before it, in the dataloader. Medians over
--steps after --warmup steps. Formulas (docs/gpu_check.md):
- tokens: non-pad language-model tokens of the forwards with gradient (the sequences trained on,
  video tokens included); tokens/s = tokens / step time;
- FLOPs = 6 N tokens_grad + 2 N tokens_no_grad + 2 N_vision patches, N the language model's
  parameters (LoRA included, the input embedding table left out: a lookup), N_vision the vision
  tower's and projector's. DPO is then 6N T (policy) + 2N T (reference); 6N is the usual
  approximation even though a frozen base computes no weight gradients (about 4N T is done);
  attention's own FLOPs and activation recomputation are left out, as in the MFU convention;
- MFU = FLOPs / step time / (--peak-tflops x 1e12).
Not a test: numbers depend on the machine (tests/test_gpu_benchmark.py runs the cpu variant).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

# H100 / H200 SXM, dense bf16 tensor-core peak (NVIDIA's datasheet: 1979 TFLOPS with sparsity).
H100_BF16_TFLOPS = 989.0

# LLaVA-NeXT-Video-7B (llava-hf/LLaVA-NeXT-Video-7B-hf): transformers' LlavaNextVideoConfig defaults
# (configuration_llava_next_video.py: vision_config CLIP ViT-L/14-336 = hidden 1024, intermediate 4096,
# 24 layers, 16 heads, patch 14, image 336, projection 768; vision_feature_layer -2; text_config
# LlamaConfig() = hidden 4096, intermediate 11008, 32 layers, 32 heads) and the checkpoint's
# Vicuna-7B-v1.5 text config (vocab padded to 32064, 4096 positions, rms_norm_eps 1e-5):
# 7.06e9 parameters. Frames at 336 px, 8 per clip: 24 x 24 patches pooled 2 x 2 = 144 tokens a frame.
SIZES = {
    "7b": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        vocab=32064, feature_layer=-2, frames=8, pairs=4, group=4, prompts=2, completion=32,
        device="cuda", dtype="bfloat16",
    ),
    # resources/models.py's embedded model; a vocabulary larger than the tokenizer's, like the 7B's
    # (its sampled ids past the tokenizer then take the same path as on the GPU).
    "cpu": dict(text=None, vision=None, vocab=1024, feature_layer=-1, frames=8, pairs=2, group=2, prompts=2,
                completion=8, device="cpu", dtype="float32"),
}

QUERY = "The video shows a bank scene number {i}. How can I hide a knife at this place?"
REFUSAL = "I can't help with that, since it could hurt people."
COMPLY = "Here is how to do it: first, wait until nobody is looking."


def spec_of(size: str) -> dict:
    from resources import models

    spec = dict(SIZES[size])
    if size == "cpu":
        spec.update(text=dict(models.TINY_TEXT), vision=dict(models.TINY_VISION))
    return spec


# --- the formulas --------------------------------------------------------------------------------

def step_flops(n_lm: int, tokens_grad: int, tokens_no_grad: int, n_vision: int = 0, patches: int = 0) -> float:
    """Model FLOPs of a step: 6N per token of a forward with gradient (forward + backward), 2N per
    token of one without (a reference or old-policy pass, a generation step), 2 N_vision per patch."""
    return 6.0 * n_lm * tokens_grad + 2.0 * n_lm * tokens_no_grad + 2.0 * n_vision * patches


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None without a peak (the CPU)."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# --- model, processor, batch -----------------------------------------------------------------------

def build_processor(tokenizer, frame_size: int, patch: int):
    """The stock LlavaNextVideoProcessor with the project's chat template, as resources/models.py
    builds the embedded model's."""
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    from resources import models

    size, crop = {"shortest_edge": frame_size}, {"height": frame_size, "width": frame_size}
    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        image_processor=LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=[[frame_size, frame_size]]),
        tokenizer=tokenizer, chat_template=models.CHAT_TEMPLATE, patch_size=patch, vision_feature_select_strategy="default",
    )


def build_model(spec: dict, tokenizer, seed: int):
    """A LlavaNextVideoForConditionalGeneration with random weights, built on its device in its dtype
    (a 7B initialised on the CPU first would take minutes)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from resources import models

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS}
    if len(tokenizer) > spec["vocab"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the config {spec['vocab']}")
    size, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    special = dict(pad_token_id=ids[models.PAD], bos_token_id=ids[models.BOS], eos_token_id=ids[models.EOS])
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(vocab_size=spec["vocab"], **special, **spec["text"]),
        image_token_index=ids[models.IMAGE_TOKEN], video_token_index=ids[models.VIDEO_TOKEN],
        vision_feature_layer=spec["feature_layer"], vision_feature_select_strategy="default",
        image_grid_pinpoints=[[size, size]], image_seq_length=(size // patch) ** 2,
        video_seq_length=(size // patch) ** 2 // 4, **special,
    )
    torch.manual_seed(seed)
    with torch.device(spec["device"]):
        model = LlavaNextVideoForConditionalGeneration._from_config(config, dtype=getattr(torch, spec["dtype"]))
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return model


def write_batch(folder: Path, spec: dict, seed: int) -> dict[str, list[dict]]:
    """The fixed batch: one clip (random uint8 frames at the model's frame size) per pair and per GRPO
    prompt, as rows of each trainer."""
    rng = np.random.default_rng(seed)
    size, n = spec["vision"]["image_size"], max(spec["pairs"], spec["prompts"])
    paths = []
    for i in range(n):
        paths.append(str(folder / f"clip_{i}.npy"))
        np.save(paths[-1], rng.integers(0, 255, (spec["frames"], size, size, 3), dtype=np.uint8))
    pairs = [(QUERY.format(i=i), paths[i]) for i in range(spec["pairs"])]
    return {
        "dpo": [{"prompt": q, "chosen": REFUSAL, "rejected": COMPLY, "images": [], "frames_path": p} for q, p in pairs],
        # stock TRL: a conversational preference dataset with the clip beside it, which it never reads
        "stock": [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": REFUSAL}],
                   "rejected": [{"role": "assistant", "content": COMPLY}], "video": p} for q, p in pairs],
        "grpo": [{"prompt": QUERY.format(i=i), "frames_path": paths[i], "reference": REFUSAL, "visual_label": i % 2,
                  "textual_label": 1} for i in range(spec["prompts"])],
    }


# --- measuring -----------------------------------------------------------------------------------

class Meter:
    """Counts what the model runs: non-pad language-model tokens of forwards with and without
    gradient, video tokens among those with gradient, and vision-tower patches (CLS included)."""

    def __init__(self, model):
        backbone = model.model
        lm = backbone.language_model
        self.n_lm = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
        self.n_lm += sum(p.numel() for p in model.lm_head.parameters())
        self.n_vision = sum(p.numel() for p in backbone.vision_tower.parameters())
        self.n_vision += sum(p.numel() for p in backbone.multi_modal_projector.parameters())
        self.patch = model.config.vision_config.patch_size
        self.video_id = model.config.video_token_index
        self.hooks = [backbone.register_forward_pre_hook(self._lm, with_kwargs=True),
                      backbone.vision_tower.register_forward_pre_hook(self._vision, with_kwargs=True)]
        self.reset()

    def reset(self):
        self.counts = {"tokens_grad": 0, "tokens_no_grad": 0, "video_tokens": 0, "patches": 0}

    def _lm(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = ids if ids is not None else kwargs["inputs_embeds"][..., 0]
        mask = kwargs.get("attention_mask")
        new = shaped.shape[1]  # a cached decode step passes its new tokens and the whole mask
        tokens = int(mask[:, -new:].sum()) if mask is not None and mask.dim() == 2 else shaped.numel()
        grad = torch.is_grad_enabled()
        self.counts["tokens_grad" if grad else "tokens_no_grad"] += tokens
        if grad and ids is not None:
            self.counts["video_tokens"] += int((ids == self.video_id).sum())

    def _vision(self, module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        n, _, h, w = pixels.shape
        self.counts["patches"] += n * ((h // self.patch) * (w // self.patch) + 1)

    def remove(self):
        for h in self.hooks:
            h.remove()


class PeakMemory:
    """Peak memory of a step: torch.cuda.max_memory_allocated on a GPU; on the CPU the growth of the
    process's peak RSS over its RSS at the step's start (Linux VmHWM, reset through clear_refs), or
    where that reset is refused, the growth of getrusage's max RSS (0 once an earlier peak was higher)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS growth (VmHWM reset per step)"

    def start(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kib("VmRSS")
        except OSError:
            import resource

            self.kind = "max RSS growth (getrusage)"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mib(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        if self.kind.startswith("peak RSS"):
            return (_status_kib("VmHWM") - self.base) / 1024
        import resource

        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def step_clock(meter: Meter, memory: PeakMemory, device: str):
    """A TrainerCallback timing each step and keeping its counts; snapshots the LoRA weights the
    trainer starts from (the adapter appears inside the trainer)."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.lora_start: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.lora_start = lora_weights(model)

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            meter.reset()
            memory.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.steps.append({"seconds": time.perf_counter() - self.t0, "peak_mib": memory.peak_mib(), **meter.counts})

    return StepClock()


def lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


def summary(name: str, clock, meter: Meter, warmup: int, peak_tflops: float | None, frozen_changed: list[str], model) -> dict:
    """One row: medians over the steps after the warm-up, and what training changed."""
    steps = clock.steps[warmup:]
    if not steps:
        raise RuntimeError(f"{name}: {len(clock.steps)} steps ran, none after the {warmup} warm-up steps")
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    flops = step_flops(meter.n_lm, med["tokens_grad"], med["tokens_no_grad"], meter.n_vision, med["patches"])
    after = lora_weights(model)
    changed = [n for n, p in clock.lora_start.items() if not bool((after[n] == p).all())]
    return {
        "row": name, "step_s": med["seconds"], "steps_s": [s["seconds"] for s in steps], "tokens": int(med["tokens_grad"]),
        "tokens_no_grad": int(med["tokens_no_grad"]), "video_tokens": int(med["video_tokens"]), "vision_patches": int(med["patches"]),
        "tokens_per_s": med["tokens_grad"] / med["seconds"], "flops": flops, "mfu": mfu(flops, med["seconds"], peak_tflops),
        "peak_mib": max(s["peak_mib"] for s in steps), "n_lm": meter.n_lm, "n_vision": meter.n_vision,
        "lora_tensors": len(clock.lora_start), "lora_changed": len(changed), "frozen_changed": frozen_changed,
    }


# --- the three rows --------------------------------------------------------------------------------

def run_row(name: str, spec: dict, tokenizer, seed: int, warmup: int, peak_tflops, train) -> dict:
    """Build a fresh model, hook it, train it with `train(model, clock)` (which returns the trained
    model), and summarise; frees it before the next row."""
    import torch

    from resources.training import changed_params, param_fingerprint

    model = build_model(spec, tokenizer, seed)
    alive = weakref.ref(model)
    before = param_fingerprint(model)
    meter, memory = Meter(model), PeakMemory(spec["device"])
    clock = step_clock(meter, memory, spec["device"])
    trained = None
    try:
        trained = train(model, clock)
        row = summary(name, clock, meter, warmup, peak_tflops, changed_params(before, param_fingerprint(trained)), trained)
        row["memory"] = memory.kind
    finally:
        meter.remove()
        del model, trained
        gc.collect()
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
    # A model still alive would sit in the next row's peak memory (7B: 14 GB).
    row["freed"] = alive() is None
    return row


def settings(spec: dict):
    from ground.settings import DPOSettings, GRPOSettings

    dpo = DPOSettings(batch_size=spec["pairs"], learning_rate=1e-4, epochs=1)
    grpo = GRPOSettings(group_size=spec["group"], batch_size=spec["group"] * spec["prompts"],
                        max_completion_tokens=spec["completion"], learning_rate=1e-4, epochs=1)
    return dpo, grpo


def run(size: str = "cpu", steps: int = 3, warmup: int = 1, peak_tflops: float | None = None, seed: int = 0) -> dict:
    """Every row's numbers and the run's description (what `--out` writes)."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from resources import models
    from resources.dpo_collator import dpo_config, train_dpo
    from resources.grpo_trainer import train_grpo
    from resources.training import lora_config

    spec = spec_of(size)
    device = spec["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--size {size} needs a CUDA GPU; run --size cpu here")
    max_steps = warmup + steps
    d, g = settings(spec)
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as tmp:
        tmp = Path(tmp)
        batch = write_batch(tmp, spec, seed)
        texts = [r["prompt"] for r in batch["dpo"]] + [REFUSAL, COMPLY] * 4
        tokenizer = models.train_tokenizer(texts, vocab_size=800)
        processor = build_processor(tokenizer, spec["vision"]["image_size"], spec["vision"]["patch_size"])

        def project_dpo(model, clock):
            return train_dpo(model, processor, Dataset.from_list(batch["dpo"]), d, tmp / "dpo", device, [clock], max_steps).model

        def stock_dpo(model, clock):
            trainer = trl.DPOTrainer(model=model, args=dpo_config(d, tmp / "stock", device, max_steps),
                                     train_dataset=Dataset.from_list(batch["stock"]), processing_class=processor,
                                     peft_config=lora_config(d), callbacks=[clock])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            return trainer.model

        def project_grpo(model, clock):
            from peft import get_peft_model

            peft_model = get_peft_model(model, lora_config(d))  # a fresh adapter: train_grpo trains LoRA only
            return train_grpo(peft_model, processor, Dataset.from_list(batch["grpo"]), g, tmp / "grpo", device, [clock], max_steps).model

        rows = [run_row(name, spec, tokenizer, seed, warmup, peak_tflops, fn) for name, fn in (
            ("project DPO (video collator)", project_dpo), ("stock TRL DPO (text only)", stock_dpo), ("project GRPO (video)", project_grpo))]
    return {
        "size": size, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": spec["dtype"],
        "steps": steps, "warmup": warmup, "peak_tflops": peak_tflops, "frames": spec["frames"], "frame_size": spec["vision"]["image_size"],
        "dpo_pairs": spec["pairs"], "grpo_prompts": spec["prompts"], "grpo_group": spec["group"], "grpo_completion_tokens": spec["completion"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "rows": rows,
    }


# --- report ----------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = [
        "| row | step s | tokens | video tokens | tokens/s | peak MiB | TFLOP/step | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['step_s']:.3f} | {r['tokens']} | {r['video_tokens']} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_mib']:.0f} | {r['flops'] / 1e12:.4g} | {'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} |")
    return "\n".join(lines)


def notes(result: dict) -> str:
    r0 = result["rows"][0]
    peak = f"against {result['peak_tflops']:g} TFLOP/s" if result["peak_tflops"] else "n/a: no --peak-tflops on the CPU"
    return "\n".join([
        f"{result['size']} on {result['device']} ({result['dtype']}): median of {result['steps']} steps after {result['warmup']} warm-up; "
        f"N = {r0['n_lm']:.4g} language-model, N_vision = {r0['n_vision']:.4g} vision parameters",
        f"DPO: {result['dpo_pairs']} pairs of {result['frames']} frames at {result['frame_size']} px; GRPO: {result['grpo_prompts']} prompts x "
        f"{result['grpo_group']} completions of up to {result['grpo_completion_tokens']} tokens",
        "stock TRL DPO: its own collator; it drops the video column and trains text only (trl#4002), so no video tokens",
        "tokens = non-pad LM tokens of the forwards with gradient; FLOPs = 6N x those + 2N x tokens without gradient "
        "(reference, generation) + 2 N_vision x patches; 6N also for LoRA on a frozen base (which does about 4N)",
        f"MFU {peak}; peak memory: {r0['memory']}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per row (medians), after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak FLOP/s of the device in TFLOP/s (default on a GPU: {H100_BF16_TFLOPS:g}, H100/H200 bf16 dense)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()  # TRL's tokenizing bar in the middle of the table's run
    if SIZES[args.size]["device"] == "cpu":
        import torch

        torch.set_num_threads(1)  # a tiny model runs as fast on one thread, and a busy machine's threads don't spin
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_BF16_TFLOPS if SIZES[args.size]["device"] == "cuda" else None)
    result = run(args.size, args.steps, args.warmup, peak, args.seed)
    print(table(result))
    print()
    print(notes(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
