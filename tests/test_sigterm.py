"""A terminated run fails loudly: it saves a checkpoint, says how to resume and exits 128 + signal."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

import insitu.pipelines.pretrain as pretrain_module
from insitu.checkpoints import check_checkpoint
from insitu.cli import main
from insitu.config import load_config
from insitu.errors import RunInterrupted
from insitu.pipelines.pretrain import pretrain
from tests.conftest import REPO, tiny_config

LONG = {"max_steps": 5000, "batch_size": 4, "checkpoint_every": 5000, "log_every": 1}  # still running when the signal comes


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues(tmp_path, shapes_dir):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config(shapes_dir, tmp_path / "runs", train=LONG)))
    run = tmp_path / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", "import sys; from insitu.cli import main; sys.exit(main())", "-q", "pretrain", "-c", "run.yaml"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "logs" / "metrics.csv").is_file():  # the CSV logger's first flush: training has begun
            assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (out, err)
    stopped = re.search(r"SIGTERM stopped the run at step (\d+) of 5000; checkpoint saved to (\S+)", " ".join(err.split()))
    assert stopped, err
    assert "resume with: insitu pretrain -c run.yaml --resume" in err
    step = int(stopped.group(1))
    assert step > 0 and check_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()  # no result that looks finished

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["-q", "pretrain", "-c", "run.yaml", "--resume", "--set", f"train.max_steps={step + 2}"]) == 0
    finally:
        os.chdir(cwd)
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2
    with open(run / "logs" / "metrics.csv", newline="") as f:
        logged = sorted({int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")})
    assert logged == list(range(step + 2))  # the earlier segment's steps, then the resumed ones, none twice


class _SignalAt(Callback):
    """Sends ``signum`` to this process as step ``at`` begins, i.e. mid-step (the handler runs in the main thread)."""

    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def on_train_batch_start(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_step_stops_after_that_step_with_exit_code_128_plus_signal(tmp_path, shapes_dir, monkeypatch, signum):
    build = pretrain_module.build_trainer

    def with_signal(*args, **kwargs):  # noqa: ANN002, ANN003
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(_SignalAt(signum, 2))
        return trainer

    monkeypatch.setattr(pretrain_module, "build_trainer", with_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs", train=LONG))
    with pytest.raises(RunInterrupted, match=f"{signal.Signals(signum).name} stopped the run at step 3 of 5000") as caught:
        pretrain(cfg, quiet=True)
    assert caught.value.exit_code == 128 + signum and caught.value.step == 3
    assert check_checkpoint(cfg.run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the caller's handlers are back
