"""Every file the toolkit reads is loaded with weights_only=True: a crafted file is refused before its code runs.

``Payload`` pickles as a call that creates a marker file: a reader that unpickled it would leave the marker.
Each test checks the marker is absent after the refusal (and, once, that the payload is live).
"""
import os
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

import PUD
import pbe_main
import train_blend
from conftest import TINY_ATTACK, cli
from test_resume import assert_same_run
from utils.run.checkpoint import check_plain, load_checkpoint
from utils.run.errors import UserError
from utils.run.resume import rng_state, set_rng_state

ATTACK2 = (*TINY_ATTACK, "--n_iters", "2", "--schedulerC_milestones", "1")


class Payload:
    """Unpickling this creates ``path`` (``open(path, 'w')``): a checkpoint that runs code while it loads."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def interrupted(tiny_attack_run, tmp_path_factory):
    """A tiny attack stopped by SIGTERM before its second epoch: a version-2 state.pt to resume."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    os.environ["PUD_INJECT_SIGTERM_AT"] = "2:0"
    try:
        assert cli(train_blend.main, *ATTACK2, "--out_dir", out) == 143
    finally:
        del os.environ["PUD_INJECT_SIGTERM_AT"]
    return out


def test_what_we_write_loads_with_weights_only(tiny_attack_run, interrupted):
    ck = torch.load(tiny_attack_run / "model.pt", weights_only=True)
    assert type(ck["versions"]["torch"]) is str
    state = torch.load(interrupted / "state.pt", weights_only=True)
    assert state["version"] == 2 and type(state["objects"]["sched"]["milestones"]) is dict


def test_check_plain_refuses_what_would_need_a_pickled_global():
    check_plain({"a": [1, 2.0, "x", None, True, torch.zeros(2)], 3: {"b": []}})
    for bad in (np.float64(1.0), torch.__version__, (1, 2), Counter({3: 1}), np.zeros(2), {(1, 2): 0}):
        with pytest.raises(TypeError):
            check_plain({"k": [bad]})


def test_rng_states_round_trip_in_both_forms():
    """numpy, python and torch draws after ``set_rng_state`` repeat those after ``rng_state``; also from the
    version-1 form (numpy's and python's own tuples)."""
    gen = torch.Generator().manual_seed(5)
    np.random.seed(1), random.seed(2), torch.manual_seed(3)
    new = rng_state(gen)
    old = dict(new, numpy=np.random.get_state(), python=random.getstate())

    def draws():
        return np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist()

    first = draws()
    check_plain(new)
    for state in (new, old):
        np.random.seed(9), random.seed(9), torch.manual_seed(9)
        set_rng_state(state, gen)
        assert draws() == first


def test_a_malicious_model_pt_is_refused_unrun(tiny_attack_run, tmp_path, capsys):
    marker, evil = tmp_path / "marker", tmp_path / "model.pt"
    ck = torch.load(tiny_attack_run / "model.pt", weights_only=True)
    torch.save(dict(ck, metrics={"clean_acc": Payload(marker)}), evil)
    for main, extra in ((PUD.main, ()), (pbe_main.main, ()), (pbe_main.main, ("--progressive",))):
        out = tmp_path / "out"
        assert cli(main, "--model_path", evil, "--device", "cpu", "--out_dir", out, *extra) == 2
        line = one_error_line(capsys)
        assert "holds pickled Python objects (io.open)" in line and "could run code" in line, line
        assert not marker.exists() and not out.exists()
    torch.load(evil, weights_only=False)  # the payload is live: a reader that unpickled it would have run it
    assert marker.exists()


def test_a_malicious_state_pt_is_refused_unrun(interrupted, tmp_path, capsys):
    run = shutil.copytree(interrupted, tmp_path / "run")
    marker = tmp_path / "marker"
    state = torch.load(run / "state.pt", weights_only=True)
    torch.save(dict(state, carry={"epoch": 1, "rec": Payload(marker)}), run / "state.pt")
    assert cli(train_blend.main, *ATTACK2, "--out_dir", run, "--resume") == 2
    assert "state.pt' holds pickled Python objects (io.open)" in one_error_line(capsys)
    assert not marker.exists()


def test_checkpoints_and_states_of_version_1_are_still_read(tiny_attack_run, interrupted, tmp_path, capsys):
    """A model.pt with torch's TorchVersion in ``versions`` loads; a version-1 state.pt (numpy RNG array, tuples,
    the scheduler's Counter) resumes to exactly the uninterrupted run."""
    old_ck = tmp_path / "old_model.pt"
    ck = torch.load(tiny_attack_run / "model.pt", weights_only=True)
    torch.save(dict(ck, versions=dict(ck["versions"], torch=torch.__version__)), old_ck)
    assert load_checkpoint(str(old_ck))["arch"] == "cnn"

    run = shutil.copytree(interrupted, tmp_path / "run")
    st = torch.load(run / "state.pt", weights_only=True)
    npst, pyst = st["rng"]["numpy"], st["rng"]["python"]
    st["rng"]["numpy"] = (npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                          npst["cached_gaussian"])
    st["rng"]["python"] = (pyst["version"], tuple(pyst["internal"]), pyst["gauss_next"])
    st["objects"]["sched"]["milestones"] = Counter(st["objects"]["sched"]["milestones"])
    torch.save(dict(st, version=1), run / "state.pt")
    with pytest.raises(Exception):
        torch.load(run / "state.pt", weights_only=True)  # it does need the numpy globals
    assert cli(train_blend.main, *ATTACK2, "--out_dir", run, "--resume") == 0
    ref = tmp_path / "ref"
    assert cli(train_blend.main, *ATTACK2, "--out_dir", ref) == 0
    assert_same_run(ref, run)


def test_a_garbage_file_is_not_called_a_pickle(tmp_path):
    from utils.run.checkpoint import safe_load

    (tmp_path / "g.pt").write_bytes(b"garbage bytes")
    with pytest.raises(UserError, match="is not a torch file .*; start over"):
        safe_load(str(tmp_path / "g.pt"), "checkpoint", "unused", "start over")


def test_a_setting_added_since_a_run_started_counts_as_its_default():
    """A version-1 defense state has no --train_data/--allow_pickle/...: those read as their defaults."""
    from config import parse_args
    from utils.run.resume import setting_differences, comparable_args, default_args

    job = parse_args("pud", ["--model_path", "m.pt", "--device", "cpu"])
    now, defaults = comparable_args(job), default_args(job)
    old = {k: v for k, v in now.items() if k not in ("allow_pickle", "train_data", "mean")}
    assert setting_differences(old, now, defaults) == []
    other = comparable_args(parse_args("pud", ["--model_path", "m.pt", "--device", "cpu", "--steps", "2", "--step_epochs",
                                                "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0", "0",
                                                "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6",
                                                "--top_rates", "0.5"]))
    diff = setting_differences({k: v for k, v in now.items() if k != "steps"}, other, defaults)
    assert "--steps 2 (the run used 5)" in diff
