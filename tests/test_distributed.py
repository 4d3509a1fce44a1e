"""Training on two gloo processes (torchrun) on the CPU: the same result as one process, and resuming after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_finetune import data  # noqa: F401

from lageo_utils.checkpoints import CheckpointError, load_checkpoint

pytestmark = pytest.mark.slow
ARGS = ["--model", "lageo-tiny", "--pretrained", "none", "--strategy", "partial", "--lr", "1e-3", "--batch-size", "16",
        "--num-workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(data, out: Path, nproc: int, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "lageo_utils.cli", "train", "--splits", str(data.splits), "--image-root",
            str(data.images), "--out", str(out), *ARGS, *extra]


def train(data, out: Path, nproc: int, *extra: str) -> None:
    subprocess.run(train_command(data, out, nproc, *extra), check=True, env=ENV, capture_output=True, timeout=300)


def assert_same_training(a: Path, b: Path) -> None:
    """Same history and weights up to float rounding: summing gradients over processes changes the order of
    additions, and Adam's normalisation lets differences of 1e-7 grow to ~1e-5 in a few steps."""
    history_a, history_b = (pd.read_csv(p / "history.csv").drop(columns="seconds") for p in (a, b))
    pd.testing.assert_frame_equal(history_a, history_b, rtol=1e-3)
    state_a, state_b = (load_checkpoint(p / "best.pt") for p in (a, b))
    assert state_a["epoch"] == state_b["epoch"] and state_a["model"].keys() == state_b["model"].keys()
    for name, tensor in state_a["model"].items():
        torch.testing.assert_close(tensor, state_b["model"][name], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    train(data, out, 2, "--epochs", "2")
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(data, two_processes, tmp_path):
    train(data, tmp_path / "one", 1, "--epochs", "2")
    assert_same_training(tmp_path / "one", two_processes)


def test_a_killed_rank_resumes_to_the_uninterrupted_result(data, two_processes, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen(train_command(data, out, 2, "--epochs", "2"), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            try:
                if load_checkpoint(out / "last.pt")["epoch"] >= 1:
                    break
            except CheckpointError:
                pass
            time.sleep(0.05)
        workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-run; torchrun stops the other
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    interrupted_at = load_checkpoint(out / "last.pt")["epoch"]
    assert interrupted_at < 2, "the run finished before it could be killed"
    train(data, out, 2, "--epochs", "2", "--resume")
    assert_same_training(out, two_processes)
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
