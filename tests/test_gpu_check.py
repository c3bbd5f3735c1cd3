"""benchmarks/gpu_check.sh: one JSON; on a CPU machine its CPU part, with the CUDA-only parts listed as skipped."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow
def test_the_cpu_part_of_the_gpu_check_prints_one_json_and_says_what_it_skipped():
    # one defense: the check's JSON glue is the same for each, and test_stagetimer runs all three tiny defenses
    # PYTHON: this interpreter, so the check runs also where the venv is not on PATH (.venv/bin/python -m pytest)
    env = {**os.environ, "GPU_CHECK_TINY": "1", "GPU_CHECK_THREADS": "1", "GPU_CHECK_DEFENSES": "aft",
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert set(out["defense"]) == {"aft"} and out["tiny"]
    for d in out["defense"].values():
        assert 0 < d["training_share"] < 1 and d["wall"] > 0 and "train" in d["stages"]
    assert out["bench"]["cnn-amp_off-compile_off"]["pipeline_train_ips"] > 0
    tr = out["torchrun_attack_epoch"]
    assert tr["processes"] == 2 and 0 <= tr["final"]["clean_acc"] <= 1
    if not torch.cuda.is_available():
        assert out["device"] == "cpu" and out["cuda_devices"] == 0 and tr["device"] == "cpu"
        assert any("CUDA-only" in s for s in out["skipped"]) and list(out["bench"]) == ["cnn-amp_off-compile_off"]
