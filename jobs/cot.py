"""`python -m jobs.cot <spec>`: VideoSafety-R1's safety CoT cold start from each AT-SFT seed
(assets/cot.py launches it; resources/cot_trainer.py is the trainer)."""
from __future__ import annotations

import sys
from pathlib import Path

from jobs._job import Reporter, run
from jobs._reasoning import train_from_parent


def train_seed(spec: dict, settings, reporter: Reporter, seed: int, adapter_dir: Path) -> dict:
    from resources.cot_trainer import train_cot

    return train_from_parent(spec, settings, reporter, seed, adapter_dir, "cot", train_cot)


if __name__ == "__main__":
    run(sys.argv, train_seed)
