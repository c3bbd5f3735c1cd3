import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Under pytest-xdist (`-n auto`, the README's command) each worker is one process of its own: one thread each, and
# the scripts the tests start inherit OMP_NUM_THREADS=1, so two workers fill the two cores without oversubscribing.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if XDIST_WORKER else 2)


def run_script(*argv, timeout=600):
    """Run an entry script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name`` made by ``build(folder)`` once per test session: under pytest-xdist once for all the
    workers (they share the parent of their temporary folders; a file lock lets one build while the others wait)."""
    from filelock import FileLock

    if not XDIST_WORKER:
        out = tmp_path_factory.mktemp(name) / "run"
        build(out)
        return out
    shared = tmp_path_factory.getbasetemp().parent
    out, done = shared / name / "run", shared / name / "done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def infected_run(tmp_path_factory):
    """A tiny patch-infected CNN on the synthetic set, trained once for the whole session."""
    return built_once(tmp_path_factory, "attack", _train_infected)


def _train_infected(out):
    # --no-eval_robust: the defense tests attack the model with their own (cheaper) PGD settings, so the attack's
    # PGD-20 on 500 test images (15 s a fixture) would never be read
    r = run_script("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "patch",
                   "--train_subset", "2000", "--test_subset", "500", "--n_iters", "4", "--bs", "64", "--lr_C", "0.05",
                   "--schedulerC_milestones", "3", "--device", "cpu", "--no-eval_robust", "--out_dir", str(out))
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are faster on one thread (and much faster when the CPU is shared); restored after the module.
    Use it module-wide with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(main, *argv) -> int:
    """Run an entry script's ``main`` in this process, as ``run_cli`` does for the command line; returns the exit code.

    No interpreter start-up, so a test can afford many runs; stdout/stderr are captured by ``capsys``.
    """
    from utils.run.errors import run_cli

    try:
        run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)
    return 0


# Runs whose figures no test looks at skip them (about 1.5 s of matplotlib a run); tests/test_figures.py and the
# tests that check a run's files draw them (a later --figures wins over this).
NO_FIGURES = ("--no-figures",)
TINY_ATTACK = ("--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "patch", "--train_subset", "300",
               "--test_subset", "100", "--bs", "64", "--lr_C", "0.05", "--device", "cpu", *NO_FIGURES)


@pytest.fixture(scope="session")
def tiny_attack_run(tmp_path_factory):
    """A one-epoch patch-infected CNN on 300 synthetic images, trained in this process (a few seconds)."""
    import train_blend

    out = tmp_path_factory.mktemp("tiny") / "attack"
    assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "1", "--out_dir", out) == 0
    return out
