"""`python -m jobs.grpo <spec>`: VideoSafety-R1's Safety-Guided GRPO from each CoT seed
(assets/grpo.py launches it; resources/grpo_trainer.py is the trainer)."""
from __future__ import annotations

import sys
from pathlib import Path

from jobs._job import Reporter, run
from jobs._reasoning import train_from_parent


def train_seed(spec: dict, settings, reporter: Reporter, seed: int, adapter_dir: Path) -> dict:
    from resources.grpo_trainer import train_grpo

    return train_from_parent(spec, settings, reporter, seed, adapter_dir, "grpo", train_grpo)


if __name__ == "__main__":
    run(sys.argv, train_seed)
