"""No command deletes or overwrites what it did not write; run folders are locked; resume appends.

Every case compares the folder's files (names and bytes) before and after, so a command that
deleted or rewrote a user's file fails here.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from insitu.cli import main
from insitu.config import load_config
from insitu.errors import ConfigError
from insitu.io import OWNER_FILE, OutputExistsError, RunLockedError, claim_folder, read_owner
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.quickstart import quickstart
from tests.conftest import REPO, TINY_QUICKSTART, tiny_config


def snapshot(root):
    """{relative path: bytes} of every file under ``root`` (the user's files in these tests)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(path):
    """A folder of a user's own files, one of them where insitu writes checkpoints."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "mine.ckpt").write_bytes(b"my model")
    (path / "notes.txt").write_text("patient notes")
    (path / "config.yaml").write_text("mine: true\n")
    return snapshot(path)


def quickstart_args(out, *extra):
    args = ["--quiet", "quickstart", "--out", str(out), *extra]
    for o in TINY_QUICKSTART:
        args += ["--set", o]
    return args


def test_quickstart_refuses_a_folder_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "work"
    before = user_folder(out)
    assert main(quickstart_args(out)) == 2
    assert main(quickstart_args(out, "--overwrite")) == 2  # --overwrite never reaches others' files
    assert snapshot(out) == before
    err = capsys.readouterr().err
    assert "not written by insitu" in err and "--overwrite" in err


def test_quickstart_out_dot_keeps_the_working_directory(tmp_path, monkeypatch, capsys):
    before = user_folder(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")  # "." is resolved against the working directory, in this process as in a new one
    assert main(["--quiet", "quickstart", "--out", "."]) == 2
    assert "not written by insitu" in capsys.readouterr().err
    assert snapshot(tmp_path / "cwd") == before


def test_quickstart_twice_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out, overrides=TINY_QUICKSTART, quiet=True)
    (out / "my_analysis.txt").write_text("mine")  # a person's file beside the run
    (out / "plots").mkdir()
    (out / "plots" / "fig.png").write_bytes(b"png")
    first_ckpt = (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    second = quickstart(out, overrides=TINY_QUICKSTART, quiet=True)
    assert second["pretrain"]["steps"] == 2
    assert (out / "my_analysis.txt").read_text() == "mine" and (out / "plots" / "fig.png").read_bytes() == b"png"
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns != first_ckpt
    assert first["run_dir"] == second["run_dir"]
    record = read_owner(out)
    assert record["command"] == "quickstart" and "my_analysis.txt" not in record["entries"] and "adapter" in record["entries"]


def test_pretrain_refuses_earlier_run_without_overwrite_and_keeps_user_files(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    pretrain(cfg, quiet=True)
    run = cfg.run_dir
    (run / "mine.txt").write_text("keep me")
    before = snapshot(run)
    with pytest.raises(OutputExistsError, match="already holds checkpoints. Pass --resume"):
        pretrain(cfg, quiet=True)
    assert snapshot(run) == before
    pretrain(cfg, quiet=True, overwrite=True)
    assert (run / "mine.txt").read_text() == "keep me"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_pretrain_refuses_a_foreign_run_folder(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path / "runs")
    before = user_folder(tmp_path / "runs" / "tiny")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by insitu"):
            pretrain(load_config(raw), quiet=True, overwrite=overwrite)
    assert snapshot(tmp_path / "runs" / "tiny") == before


def test_second_run_into_a_locked_folder_is_refused(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    running = claim_folder(cfg.run_dir, "pretrain", lock=True)  # as a run in progress holds it
    (cfg.run_dir / "config.yaml").write_text("the running run's config\n")
    running.record()
    try:
        with pytest.raises(RunLockedError, match="in use by another insitu run"):
            pretrain(cfg, quiet=True, overwrite=True)
        assert (cfg.run_dir / "config.yaml").read_text() == "the running run's config\n"
    finally:
        running.unlock()
    pretrain(cfg, quiet=True, overwrite=True)  # the lock is released with its holder


def test_lock_is_held_across_processes(tmp_path):
    folder = claim_folder(tmp_path / "run", "pretrain", lock=True)
    code = (
        "import sys; from insitu.io import OwnedFolder, RunLockedError\n"
        "try:\n    OwnedFolder(sys.argv[1], 'pretrain').lock()\nexcept RunLockedError:\n    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env).returncode == 3
    folder.unlock()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env).returncode == 0


def test_tampered_ownership_record_never_reaches_outside(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    run = tmp_path / "run"
    claim_folder(run, "scan")
    (run / "manifest.csv").write_text("x")
    (run / OWNER_FILE).write_text(
        json.dumps({"created_by": "insitu", "command": "scan", "entries": ["../precious.txt", "/etc", "manifest.csv"]})
    )
    claim_folder(run, "scan", overwrite=True)
    assert outside.read_text() == "keep" and not (run / "manifest.csv").exists()


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_appends_metrics_and_continues_the_optimizer(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path / "runs", train={"max_steps": 4, "checkpoint_every": 2})
    first = pretrain(load_config(raw), quiet=True)
    run = first.run_dir
    steps_before = {int(r["step"]) for r in read_metrics(run / "logs" / "metrics.csv") if r.get("train/loss")}
    assert steps_before and max(steps_before) < 4
    raw["train"]["max_steps"] = 8
    resumed = pretrain(load_config(raw), resume=True, quiet=True)
    rows = read_metrics(run / "logs" / "metrics.csv")
    steps = sorted(int(r["step"]) for r in rows if r.get("train/loss"))
    assert set(steps) >= steps_before and max(steps) >= 4, "the earlier segment's rows must survive the resume"
    assert len(steps) == len(set(steps)), "no step is logged twice"
    assert not (run / "logs" / "metrics.before-resume.csv").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    # AdamW's step counter continued from the checkpoint: a resume that ignored it would restart at 4
    assert all(float(s["step"]) == 8 for s in ckpt["optimizer_states"][0]["state"].values())
    assert resumed.summary["wall_s"] > first.summary["wall_s"] * 0.5  # the earlier segment's time counts


@pytest.mark.parametrize("bad", ["../../escape", "a/b", "..", ""])
def test_run_name_cannot_leave_out_dir(tmp_path, shapes_dir, bad):
    with pytest.raises(ConfigError, match="plain folder name"):
        load_config(tiny_config(shapes_dir, tmp_path / "runs", name=bad))


def test_scan_refuses_to_replace_without_overwrite(tmp_path, shapes_dir, capsys):
    out = tmp_path / "scan"
    assert main(["--quiet", "scan", str(shapes_dir), "--out", str(out)]) == 0
    first = (out / "manifest.csv").read_bytes()
    (out / "manifest.csv").write_text("edited by hand\n")
    assert main(["--quiet", "scan", str(shapes_dir), "--out", str(out)]) == 2
    assert (out / "manifest.csv").read_text() == "edited by hand\n"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--quiet", "scan", str(shapes_dir), "--out", str(out), "--overwrite"]) == 0
    assert (out / "manifest.csv").read_bytes() == first
    foreign = tmp_path / "foreign"
    before = user_folder(foreign)
    assert main(["--quiet", "scan", str(shapes_dir), "--out", str(foreign), "--overwrite"]) == 2
    assert snapshot(foreign) == before


def test_adapter_export_and_apply_refuse_existing_files(tmp_path, shapes_dir, capsys):
    import yaml

    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs", train={"max_steps": 1}))
    pkg = pretrain(cfg, quiet=True).adapter_dir
    zip_out = tmp_path / "site.zip"
    zip_out.write_bytes(b"someone's zip")
    assert main(["--quiet", "adapter", "export", str(pkg), "--out", str(zip_out)]) == 2
    assert zip_out.read_bytes() == b"someone's zip"
    assert main(["--quiet", "adapter", "export", str(pkg), "--out", str(zip_out), "--overwrite"]) == 0
    assert zip_out.read_bytes()[:2] == b"PK"
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": tiny_config(shapes_dir, tmp_path)["backbone"]}))
    feats = tmp_path / "feats.safetensors"
    feats.with_suffix(".json").write_text("mine")
    args = ["--quiet", "adapter", "apply", str(pkg), "--base", str(base), "--data", str(shapes_dir), "--out", str(feats)]
    assert main(args) == 2
    assert feats.with_suffix(".json").read_text() == "mine" and not feats.exists()
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(feats.with_suffix(".json").read_text())["package"] == "adapter"  # a name, never a local path


def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tmp_path, shapes_dir, monkeypatch):
    """Deterministic views and one full batch per step: a kill-and-resume run must match an uninterrupted one."""
    import lightning as L

    from insitu.adapters.package import load_package
    from insitu.pipelines import pretrain as pretrain_module

    views = {"local_crops": 0, "global_scale": [1.0, 1.0], "flip": False, "blur_prob": 0.0, "intensity": 0.0}
    train = {"max_steps": 6, "checkpoint_every": 3, "batch_size": 24, "warmup_steps": 1}

    def config(name):
        raw = tiny_config(shapes_dir, tmp_path / "runs", name=name, train=train)
        raw["objective"]["options"]["views"] = views
        return load_config(raw)

    straight = pretrain(config("straight"), quiet=True)

    class StopAt3(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 3

    make_trainer = pretrain_module.build_trainer
    monkeypatch.setattr(pretrain_module, "build_trainer", lambda *a: (lambda t: (t.callbacks.append(StopAt3()), t)[1])(make_trainer(*a)))
    first = pretrain(config("resumed"), quiet=True)
    assert first.steps == 3
    c = load_package(first.adapter_dir).tensors  # before the resumed run replaces the package
    monkeypatch.setattr(pretrain_module, "build_trainer", make_trainer)
    calls = []
    step = pretrain_module.PretrainModule.training_step
    monkeypatch.setattr(pretrain_module.PretrainModule, "training_step", lambda self, *a: (calls.append(1), step(self, *a))[1])
    resumed = pretrain(config("resumed"), resume=True, quiet=True)
    # 3 steps ran after the resume, and they reached the 6-step state: the other 3 came from the checkpoint
    assert resumed.steps == 6 and len(calls) == 3
    a, b = load_package(straight.adapter_dir).tensors, load_package(resumed.adapter_dir).tensors
    moved = max((a[k] - c[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "the last three steps must change the adapters"
    assert gap < 1e-3 * moved, f"resumed run drifted from the uninterrupted one: {gap:.2e} vs step size {moved:.2e}"
