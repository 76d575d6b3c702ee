"""Training as a launched job: `accelerate launch -m jobs.dpo` from the settings' launch block.

Two CPU processes (gloo) at global batch B train the same adapter, to tolerance, as one process at
batch B: DDP averages the two half-batch gradients into the full batch's. The same job at a
different global batch trains a different adapter, so the comparison can fail.
"""
import json
import os
import socket
import subprocess

import numpy as np
import pytest
from test_dpo import _rows
from test_models import TEXTS

from ground.settings import PROJECT_ROOT, DPOSettings, LaunchSettings, Settings
from resources import models
from resources.launch import accelerate_command, write_spec

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from datasets import Dataset

    from ground.checkpoints import CheckpointRecord

    tmp = tmp_path_factory.mktemp("launch")
    models.build_tiny_video_llm(tmp / "base" / "weights", TEXTS, seed=3)
    CheckpointRecord.local(tmp / "base", tmp / "base" / "weights", name="base", method="embedded-pretrain", taxonomy_version="-").save(tmp / "base")
    Dataset.from_list(_rows(tmp, 16, seed=2)).save_to_disk(str(tmp / "pairs"))
    return tmp


def train(world, name: str, processes: int, per_process_batch: int) -> dict:
    """The adapter's weights after jobs.dpo ran under accelerate with `processes` CPU processes."""
    from safetensors.numpy import load_file

    settings = Settings(
        data_dir=str(world / "data"),
        dpo=DPOSettings(epochs=1, learning_rate=2e-3, batch_size=per_process_batch, replicate_seeds=[]),
        # one thread per process either way: the same float sums
        launch=LaunchSettings(num_processes=processes, main_process_port=_free_port(), cpu_threads_per_process=1),
    )
    folder = world / name
    folder.mkdir()
    spec = {"method": "dpo", "device": "cpu", "settings": settings.model_dump(mode="json"), "seeds": [[0, str(folder / "adapter")]],
            "base": str(world / "base"), "dataset": str(world / "pairs"), "result_path": str(folder / "result.json")}
    command = accelerate_command(settings.launch, "jobs.dpo", write_spec(folder, spec))
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((folder / "result.json").read_text())
    assert result["frozen_problems"] == [] and result["loss_fell"][0] is not None
    return {"weights": load_file(str(folder / "adapter" / "adapter_model.safetensors")), "steps": len(result["history"])}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow  # three launches of a training process
def test_two_processes_at_global_batch_b_train_the_adapter_of_one_process_at_b(world):
    one = train(world, "one", processes=1, per_process_batch=4)
    two = train(world, "two", processes=2, per_process_batch=2)
    other = train(world, "other", processes=1, per_process_batch=2)  # global batch 2: other steps
    assert one["steps"] == two["steps"] == 4 and other["steps"] == 8
    lora_b = {k: v for k, v in one["weights"].items() if "lora_B" in k}
    scale = max(float(np.abs(v).max()) for v in lora_b.values())
    assert scale > 1e-3  # training moved the adapter (LoRA B starts at zero)
    same, different = _max_difference(one["weights"], two["weights"]), _max_difference(one["weights"], other["weights"])
    print(f"largest LoRA B {scale:.3e}; 2 processes vs 1: {same:.3e}; global batch 2 vs 4: {different:.3e}")
    assert same < 1e-3 * scale
    assert different > 0.05 * scale


def test_the_command_follows_the_launch_settings(tmp_path):
    plain = accelerate_command(LaunchSettings(), "jobs.dpo", tmp_path / "spec.json")
    assert plain[1:3] == ["-m", "accelerate.commands.launch"] and plain[-3:] == ["-m", "jobs.dpo", str(tmp_path / "spec.json")]
    assert "--multi_gpu" not in plain and "--use_deepspeed" not in plain
    assert "--multi_gpu" in accelerate_command(LaunchSettings(num_processes=2), "jobs.dpo", tmp_path / "s.json")
    # accelerate's own default is one thread; the machine's cores are shared among its processes instead
    threads = lambda cmd: int(cmd[cmd.index("--num_cpu_threads_per_process") + 1])  # noqa: E731
    assert threads(plain) == (os.cpu_count() or 1)
    assert threads(accelerate_command(LaunchSettings(num_processes=2, cpu_threads_per_process=3), "jobs.dpo", tmp_path / "s")) == 3
    zero3 = accelerate_command(LaunchSettings(num_processes=8, deepspeed_config="deploy/deepspeed/zero3.json"), "jobs.dpo", tmp_path / "s")
    assert zero3[zero3.index("--deepspeed_config_file") + 1] == str(PROJECT_ROOT / "deploy/deepspeed/zero3.json")
    with pytest.raises(FileNotFoundError, match="deploy/deepspeed"):
        accelerate_command(LaunchSettings(deepspeed_config="deploy/deepspeed/zero4.json"), "jobs.dpo", tmp_path / "s")


def test_the_deepspeed_configs_leave_the_batch_to_the_trainer_and_multi_machine_needs_an_address():
    for stage in (2, 3):
        config = json.loads((PROJECT_ROOT / f"deploy/deepspeed/zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        # "auto": accelerate fills them from the trainer's arguments, so the settings stay the one source
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    with pytest.raises(ValueError, match="main_process_ip"):
        LaunchSettings(num_machines=2)


def test_a_step_that_never_came_back_through_pipes_is_named():
    from resources.launch import lost_steps, result_of

    results = [{"seed": 0, "history": [{"loss": 1.0}, {"loss": 0.9}]}, {"seed": 1, "history": {"1": [{"loss": 1.0}], "2": [{"loss": 0.5}]}}]
    steps = [{"kind": "step", "seed": 0, "step": 1}, {"kind": "step", "seed": 0, "step": 2}, {"kind": "step", "seed": 1, "step": 1}]
    assert lost_steps(results, steps) == {1: "2 logged, 1 received"}
    assert lost_steps(results, steps + [{"kind": "step", "seed": 1, "step": 2}]) == {}
    with pytest.raises(RuntimeError, match="without reporting its result"):
        result_of(steps, "jobs.dpo")
