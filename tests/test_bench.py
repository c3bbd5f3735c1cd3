"""benchmarks/bench.py runs end to end (tiny sizes) and the plain-script form explains the -m form."""
import json

from conftest import run_script


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


def test_script_form_says_to_use_dash_m():
    r = run_script("benchmarks/bench.py", "--arch", "cnn")
    assert r.returncode == 2 and "python -m benchmarks.bench" in r.stderr
