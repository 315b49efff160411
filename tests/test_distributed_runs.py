"""`run.py` on two gloo CPU processes: validation and `mode=eval` split across processes (each prompt sampled once,
`val/num_prompts` = `data.val_size` under DDP and FSDP, `mode=eval` on `trainer.devices`), and Lightning's
multi-node launch (two processes started by hand as two nodes) giving exactly the run two devices on one node give.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # one run of two tiny processes takes 20-60 s on a loaded 2-core machine
# Variables a launcher may have set that would change how Lightning starts processes.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "RANK")
# The tiny default job with validation before and after its steps; 5 prompts do not split evenly over 2 processes.
SMALL_RUN = (
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "data.prompts_per_step=4",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=6",
    "optim.num_minibatches=1",
    "data.val_size=5",
    "eval.every_n_steps=2",
    "eval.k=2",
    "checkpoint.every_n_steps=0",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_validation_samples_each_prompt_once(tmp_path, strategy):
    out = tmp_path / "run"
    run(*SMALL_RUN, "trainer.devices=2", f"trainer.strategy={strategy}", f"output_dir={out}", env=clean_env())
    logged = scalars(out)
    assert logged["val/num_prompts"] == [(0, 5.0), (2, 5.0)]  # before: 10 (every process sampled all 5)


def test_mode_eval_runs_on_every_configured_device(tmp_path):
    out = tmp_path / "eval"
    proc = run(
        "mode=eval",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.source=arithmetic",
        "data.val_size=5",
        "eval.k=2",
        "rollout.max_new_tokens=6",
        f"output_dir={out}",
        env=clean_env(),
    )
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout  # Lightning started the second process
    assert (proc.stdout + proc.stderr).count("arithmetic: avg@2=") == 1  # rank 0 alone reports
    assert json.loads((out / "eval_results.json").read_text())["arithmetic"]["num_prompts"] == 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_device_equal_one_node_of_two(tmp_path):
    """The multi-node launch: each node's process is started by hand with its NODE_RANK and the rendezvous address
    (what torchrun or SLURM do on real machines); the run equals two devices on one node: same logged values,
    bitwise the same final weights."""
    one_node = tmp_path / "one-node"
    run(*SMALL_RUN, "trainer.devices=2", "trainer.strategy=ddp", f"output_dir={one_node}", env=clean_env())

    two_nodes = tmp_path / "two-nodes"  # one folder for both nodes, as on a shared file system
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [*SMALL_RUN, "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp", f"output_dir={two_nodes}"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "run.py", *args],
            cwd=ROOT,
            env=clean_env(NODE_RANK=str(rank), **rendezvous),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "2 nodes" in outputs[0][0]  # the banner: rank 0 saw num_nodes=2

    want, got = scalars(one_node), scalars(two_nodes)
    assert set(got) == set(want)
    for tag in want:
        if "time" not in tag and "per_s" not in tag:
            assert got[tag] == want[tag], tag
    assert want["val/num_prompts"] == [(0, 5.0), (2, 5.0)]
    final_one, final_two = (load_file(d / "final" / "model.safetensors") for d in (one_node, two_nodes))
    assert final_one.keys() == final_two.keys()
    for name, weight in final_one.items():
        assert weight.equal(final_two[name]), name
