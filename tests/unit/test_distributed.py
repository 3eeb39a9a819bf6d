"""Training under ``accelerate launch`` (two CPU processes, gloo) follows the single-process loss curve.

Two processes each train on half of the same global batch; the token-weighted loss makes the averaged
gradient the single-process one, so the curves differ only by float32 summation order (measured: at
most ~1e-6 over 16 steps). A per-process mean instead of the token weighting is off by 1.5e-4 to 9e-3
on the same run, so the tolerance below tells the two apart.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from codeunlearn.lm.distributed import run_tiny_training
from codeunlearn.lm.prompting import IGNORE_INDEX
from codeunlearn.lm.training import shard_batch
from tests.conftest import REPO_ROOT

STEPS, GLOBAL_BATCH = 16, 8
RTOL, ATOL = 1e-5, 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(tmp_path, port: int) -> dict[str, str]:
    """No accelerate config file (HF_HOME is empty), no inherited launcher state, loopback only, 1 thread."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ACCELERATE_")}
    env.update(
        {
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    return env


def test_shards_partition_the_global_batch():
    batch = {
        "input_ids": torch.arange(15).reshape(5, 3),
        "labels": torch.arange(15).reshape(5, 3),
        "attention_mask": torch.ones(5, 3, dtype=torch.long),
    }
    shards = [shard_batch(batch, i, 2) for i in range(2)]
    assert [s["input_ids"].shape[0] for s in shards] == [3, 2]
    for name in batch:
        assert torch.equal(torch.cat([s[name] for s in shards]), batch[name])
    # More processes than rows: the extra process gets a row that counts for nothing.
    empty = shard_batch({k: v[:1] for k, v in batch.items()}, 1, 2)
    assert empty["input_ids"].shape[0] == 1 and bool((empty["labels"] == IGNORE_INDEX).all())
    assert batch["labels"][0, 0] == 0  # the source batch is untouched


def test_two_process_accelerate_matches_single_process(tmp_path):
    port = free_port()
    out = tmp_path / "ddp.json"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu picks accelerate's torchrun launcher; `--cpu` there starts one process unless MPI is set up.
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "-m",
        "codeunlearn.lm.distributed",
        "--cpu",  # every process on CPU, gloo backend
        "--threads",
        "1",
        "--steps",
        str(STEPS),
        "--batch-size",
        str(GLOBAL_BATCH),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=launch_env(tmp_path, port), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads(out.read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_tiny_training(steps=STEPS, batch_size=GLOBAL_BATCH)  # the plain loop, no accelerator
    finally:
        torch.set_num_threads(threads)

    assert ddp["num_processes"] == 2 and single["num_processes"] == 1
    assert ddp["records"] % GLOBAL_BATCH != 0  # the epoch's last batch splits unevenly over the processes
    ddp_loss = [h["loss"] for h in ddp["history"]]
    single_loss = [h["loss"] for h in single["history"]]
    assert [h["step"] for h in ddp["history"]] == list(range(STEPS))
    assert single_loss[-1] < single_loss[0] - 0.5  # it trains, so the comparison is not of flat curves
    assert ddp_loss == pytest.approx(single_loss, rel=RTOL, abs=ATOL)
    assert ddp["param_norm"] == pytest.approx(single["param_norm"], rel=1e-6)
