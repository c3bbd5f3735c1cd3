import json

import pytest

from conftest import run_script

FAST = ("--test_subset", "200", "--eval_steps", "2", "--device", "cpu")
TINY = ("--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0", "0",
        "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6", "--top_rates", "0.5", "--unlearn_epochs", "1",
        "--mt_epochs", "1", "--target_images", "200")


def test_pud_runs_end_to_end_and_writes_its_outputs(infected_run, tmp_path):
    out = tmp_path / "pud"
    r = run_script("PUD.py", "--model_path", str(infected_run / "model.pt"), "--out_dir", str(out), *TINY, *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["defense"] == "pud"
    assert s["target"]["estimate"] == 0 and s["target"]["used"] == 0 and 0 < s["target"]["vote_share"] <= 1
    assert s["spectre_initial"]["removed"] > 0 and 0 <= s["spectre_initial"]["precision"] <= 1
    assert [st["step"] for st in s["steps"]] == [0, 1]
    for st in s["steps"]:
        assert 0 <= st["extra_poison_share"] <= 1 and 0 <= st["poison_precision"] <= 1 and "robust_acc" in st
    assert s["steps"][0]["next_extra_size"] == round(0.5 * s["spectre_initial"]["pool_size"])
    assert s["unlearning"]["epochs"] == 1 and isinstance(s["unlearning"]["clipped"], bool)
    for part in ("initial", "final"):
        assert {"clean_acc", "asr", "robust_acc"} <= set(s[part])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("step_summary" in rec for rec in recs) == 2
    assert (out / "curves.png").exists()

    from models import model_from_checkpoint
    from utils.checkpoint import load_checkpoint

    ck = load_checkpoint(str(out / "model.pt"))
    model = model_from_checkpoint(ck, "cpu")
    assert ck["defense"]["name"] == "pud" and model is not None


def test_pud_refuses_a_batch_mode_checkpoint(tmp_path):
    att = tmp_path / "batch"
    r = run_script("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "patch", "--poison_mode",
                   "batch", "--n_iters", "1", "--train_subset", "200", "--test_subset", "100", "--device", "cpu",
                   "--out_dir", str(att))
    assert r.returncode == 0, r.stderr
    r = run_script("PUD.py", "--model_path", str(att / "model.pt"), "--out_dir", str(tmp_path / "pud"), *TINY, *FAST)
    assert r.returncode == 2 and "PUD needs the training set's poisoned indices" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (("--steps", "2", "--step_epochs", "1"), "--step_epochs needs one value per step"),
    (("--top_rates", "0.2"), "--top_rates needs one value per step but the last"),
    (("--target_label", "99"), "--target_label 99 is not a class"),
    (("--init_ratio", "0"), "--init_ratio must be in (0, 1]"),
    (("--step_adv_epochs", "11", "2", "1", "1", "1"), "--step_adv_epochs 11 of step 0 must be between 0"),
])
def test_pud_bad_input(infected_run, tmp_path, extra, message):
    out = tmp_path / "bad"
    r = run_script("PUD.py", "--model_path", str(infected_run / "model.pt"), "--out_dir", str(out), *extra)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
