"""Interrupted, diverged and resumed runs end exactly where an uninterrupted run of the same seed ends."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import PUD
import train_blend
from conftest import NO_FIGURES, ROOT, TINY_ATTACK, built_once, cli, run_script
from utils.run.checkpoint import atomic_write, load_checkpoint

ATTACK = ("train_blend.py", *TINY_ATTACK, "--n_iters", "2", "--schedulerC_milestones", "1")
# PUD_TINY's metrics epochs: steps 1-2, unlearning 3-4, mean teacher 5-6
PUD_TINY = ("--test_subset", "100", "--eval_steps", "1", "--device", "cpu", "--target_label", "0", "--steps", "2",
            "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0", "0", "--step_eps", "6/255",
            "4/255", "--step_alpha_div", "5", "6", "--step_pgd_steps", "2", "--top_rates", "0.5", "--spectre_min", "5",
            "--unlearn_epochs", "2", "--mt_epochs", "2", *NO_FIGURES)


def records(folder):
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds", None)
    return recs


def assert_same_run(a, b):
    """Bit-exact: every tensor of the final model, the summary (but its timing) and every metrics line."""
    sa, sb = load_checkpoint(str(a / "model.pt"))["state_dict"], load_checkpoint(str(b / "model.pt"))["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ja, jb = (json.loads((f / "summary.json").read_text()) for f in (a, b))
    ja.pop("seconds"), jb.pop("seconds")
    sa_, sb_ = ja.pop("stages"), jb.pop("stages")
    assert sa_["seconds"].keys() == sb_["seconds"].keys()  # the same stages, other seconds
    # the resumed run's stages continue the saved seconds: they still add up to its (continued) wall time
    assert 0 <= sb_["unattributed"] <= 0.1 * sb_["wall"] + 0.5, sb_
    assert ja == jb
    assert records(a) == records(b)
    assert not (b / "state.pt").exists() and not (b / "failure.json").exists()


@pytest.fixture(scope="module")
def attack_reference(tmp_path_factory):
    """The uninterrupted tiny attack the resumed runs must equal, trained once a session for every worker."""
    return built_once(tmp_path_factory, "resume_reference", _train_reference)


def _train_reference(out):
    r = run_script(*ATTACK, "--out_dir", str(out))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(attack_reference, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PUD_INJECT_BATCH_SLEEP="0.3")  # a slow epoch 2, so the signal lands inside it
    p = subprocess.Popen([sys.executable, *ATTACK, "--out_dir", str(out)], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None and time.time() < deadline, "the run ended before its first epoch was logged"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM) at ") and "state saved after epoch 1" in last, err
    assert (out / "state.pt").exists() and not (out / "summary.json").exists()
    assert [r["epoch"] for r in records(out)] == [1]
    with open(out / "metrics.jsonl", "a") as f:  # as if killed between logging epoch 2 and saving its state
        f.write('{"epoch": 2, "loss": 0}\n')

    cmd = shlex.split(last.split("resume with: ")[1])
    assert cmd[:2] == ["python", "train_blend.py"] and cmd[-1] == "--resume"
    r = run_script(*cmd[1:])  # the printed command, as the user would paste it
    assert r.returncode == 0, r.stderr
    assert "resuming the run" in r.stdout
    assert_same_run(attack_reference, out)


def test_nan_stops_the_run_and_keeps_the_last_good_model_and_state(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("PUD_INJECT_NAN_AT", "2:1")
    assert cli(train_blend.main, *ATTACK[1:], "--out_dir", out) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: non-finite training loss (nan) at attack epoch 2, batch 1")
    assert "state saved after epoch 1" in err[0] and "failure.json" in err[0]
    failure = json.loads((out / "failure.json").read_text())
    assert (failure["stage"], failure["epoch"], failure["batch"], failure["last_saved_state"]) == ("attack", 2, 1, "epoch 1")
    ck = load_checkpoint(str(out / "model.pt"))
    assert ck["metrics"]["epoch"] == 1  # the last good model, not the diverged one
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["carry"]["epoch"] == 1
    for k, v in ck["state_dict"].items():
        assert torch.equal(v, state["objects"]["model"][k])
    assert not (out / "summary.json").exists()
    # resuming after a divergence is covered bit-exactly by the PUD test below


@pytest.mark.slow
def test_pud_interrupted_diverged_and_resumed_through_every_stage_is_bit_exact(attack_reference, tmp_path, monkeypatch,
                                                                                capsys):
    model = attack_reference / "model.pt"
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli(PUD.main, "--model_path", model, "--out_dir", ref, *PUD_TINY) == 0
    # interrupted in step 1, diverged in unlearning, interrupted in the mean teacher, then finished
    for hook, at, code, resume in (("PUD_INJECT_SIGTERM_AT", "2:1", 143, ()),
                                   ("PUD_INJECT_NAN_AT", "4:1", 3, ("--resume",)),
                                   ("PUD_INJECT_SIGTERM_AT", "6:0", 143, ("--resume",)),
                                   (None, None, 0, ("--resume",))):
        for var in ("PUD_INJECT_SIGTERM_AT", "PUD_INJECT_NAN_AT"):
            monkeypatch.delenv(var, raising=False)
        if hook:
            monkeypatch.setenv(hook, at)
        capsys.readouterr()
        assert cli(PUD.main, "--model_path", model, "--out_dir", out, *PUD_TINY, *resume) == code
        err = capsys.readouterr().err
        if code == 3:
            assert "non-finite unlearning loss (nan) at pud unlearning epoch 4, batch 1" in err
            assert json.loads((out / "failure.json").read_text())["stage"] == "pud unlearning"
        if code == 143:
            assert "resume with: python PUD.py" in err
    assert_same_run(ref, out)


def test_torn_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"the good checkpoint")

    def dies_halfway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a che")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), dies_halfway)
    assert path.read_bytes() == b"the good checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_write_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    """The temp file is fsynced while it still holds the new bytes under its temp name, then the folder."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name an open file descriptor")
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(target), os.path.isdir(target) or open(target, "rb").read()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(str(tmp_path / "model.pt"), lambda tmp: open(tmp, "wb").write(b"new"))
    assert synced[0][0].startswith("model.pt.") and synced[0][1] == b"new"
    assert synced[-1] == (tmp_path.name, True)
