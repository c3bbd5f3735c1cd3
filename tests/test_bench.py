"""benchmarks/bench.py runs end to end (tiny sizes), as a module and as a file."""
import pytest
import json
import os
import subprocess
import sys

from conftest import ROOT, run_script


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "b.json"
    r = run_script("-m", "benchmarks.bench", "--arch", "cnn", "--bs", "16", "--batches", "2", "--repeats", "1",
                   "--matmul_n", "256", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for k in ("model_train_ips", "pipeline_train_ips", "reference_train_ips", "pgd_ips", "eval_ips", "matmul_gflops",
              "conv_gflops", "pgd_cost_ratio", "speedup_vs_reference", "mfu", "mfu_vs_best_kernel"):
        assert res[k] > 0, k
    assert abs(res["train_gflop_per_image"] - 3 * res["fwd_gflop_per_image"]) < 1e-3
    assert "pipeline_over_model" in r.stdout


@pytest.mark.slow
def test_script_form_runs_from_any_folder_and_writes_json_where_asked(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--arch", "cnn", "--bs", "16",
                        "--batches", "1", "--repeats", "1", "--matmul_n", "128", "--threads", "1", "--json", "rel.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "rel.json").read_text())["arch"] == "cnn"
    assert "pipeline_over_model" in r.stdout
