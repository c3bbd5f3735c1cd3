import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)


def run_script(*argv, timeout=600):
    """Run an entry script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def infected_run(tmp_path_factory):
    """A tiny patch-infected CNN on the synthetic set, trained once for the whole session."""
    out = tmp_path_factory.mktemp("attack") / "run"
    r = run_script("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "patch",
                   "--train_subset", "2000", "--test_subset", "500", "--n_iters", "4", "--bs", "64", "--lr_C", "0.05",
                   "--schedulerC_milestones", "3", "--device", "cpu", "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    return out
