"""End-to-end runs through the `insitu` command: kill + resume, 2-process DDP, quickstart, CLI errors.

A separate process only where the test is about processes (a SIGKILL, DDP's workers): everything
else calls ``insitu.cli.main`` in this process, which skips ~12 s of imports per command.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from insitu.cli import main
from tests.conftest import REPO, TINY_PROBE, TINY_QUICKSTART, tiny_config


def write_cfg(tmp_path, raw):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args, timeout=240):  # below pytest's own limit (pyproject), so this one can fire
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "insitu", "--quiet", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume(tmp_path, shapes_dir):
    # a real SIGKILL needs its own process; the resume does not (it reads only what the killed run left on disk)
    raw = tiny_config(shapes_dir, tmp_path / "runs", train={"max_steps": 120, "checkpoint_every": 5, "batch_size": 4})
    cfg = write_cfg(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "insitu", "--quiet", "pretrain", "-c", str(cfg)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the deadline"
    import torch

    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < 120, "the run finished before it could be killed"
    assert main(["--quiet", "pretrain", "-c", str(cfg), "--resume"]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["steps"] == 120
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]  # finite, not NaN


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, shapes_dir):
    raw = tiny_config(
        shapes_dir,
        tmp_path / "runs",
        train={"max_steps": 2, "batch_size": 4},
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
    )
    out = run_cli("pretrain", "-c", str(write_cfg(tmp_path, raw)))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter.safetensors").exists()


def test_quickstart_tiny(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["--quiet", "quickstart", "--out", str(out)]
    for o in TINY_QUICKSTART:
        args += ["--set", o]
    assert main(args) == 0
    for rel in (
        "adapter/adapter.safetensors",
        "adapter/insitu.json",
        "adapter/README.md",
        "report.md",
        "loss_curve.png",
        "config.yaml",
        "probe.csv",
    ):
        assert (out / rel).exists(), rel
    report = (out / "report.md").read_text()
    assert "randomly initialised" in report and "frozen backbone" in report and "![loss curve](loss_curve.png)" in report
    printed = capsys.readouterr().out
    assert "probe (frozen features)" in printed and "insitu quickstart" in printed
    assert main(["adapter", "inspect", str(out / "adapter")]) == 0
    assert "fingerprint" in capsys.readouterr().out


def test_quickstart_defaults_to_the_shipped_base(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["--quiet", "quickstart", "--out", str(out)]
    for o in ("train.max_steps=1", "train.batch_size=8", "data.image_size=32", "backbone.img_size=32", "probe.knn_k=3", *TINY_PROBE):
        args += ["--set", o]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "insitu:colour_vit_tiny" in report and "randomly initialised" not in report
    meta = json.loads((out / "adapter" / "insitu.json").read_text())
    assert "insitu:colour_vit_tiny" in json.dumps(meta)


def test_cli_config_error_exit_code(tmp_path, shapes_dir, capsys):
    raw = tiny_config(shapes_dir, tmp_path / "runs")
    raw["adapter"]["options"]["bottleneck"] = 8
    assert main(["pretrain", "-c", str(write_cfg(tmp_path, raw))]) == 2
    assert "unknown key 'adapter.options.bottleneck'; did you mean 'adapter.options.bottleneck_dim'" in capsys.readouterr().err.replace("\n", "")


def test_cli_scan_quarantines_but_exits_zero(tmp_path, shapes_dir, capsys):
    (shapes_dir / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert main(["scan", str(shapes_dir), "--domain", "images", "--out", str(tmp_path / "scan")]) == 0
    assert "broken.png" in (tmp_path / "scan" / "quarantine.csv").read_text()
    assert len((tmp_path / "scan" / "manifest.csv").read_text().splitlines()) == 25
    (tmp_path / "empty").mkdir()
    assert main(["scan", str(tmp_path / "empty"), "--out", str(tmp_path / "scan2")]) == 1
    assert main(["scan", str(tmp_path / "nowhere"), "--out", str(tmp_path / "scan3")]) == 2
    assert main(["scan", str(shapes_dir), "--out", str(tmp_path / "scan4"), "--option", "chanels=1"]) == 2


def test_help_on_every_command():
    for args in (
        ["--help"],
        ["quickstart", "--help"],
        ["pretrain", "--help"],
        ["probe", "--help"],
        ["scan", "--help"],
        ["adapter", "inspect", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
