"""Defense benchmark: the README's quick AFT, PBE and PUD commands end to end on the synthetic set.

    python -m benchmarks.bench_defense --threads 1
    python -m benchmarks.bench_defense --model runs/synth-blend/model.pt --repeats 3 --json bench-defense.json
    python -m benchmarks.bench_defense --tiny     # seconds, not minutes: the same pipeline on a tiny model

Without ``--model`` it first trains the README's infected blend CNN (``train_blend.py``, 5 epochs) into
``--work``. Every defense runs as its own process, as a user runs it; its figures come from the run's
summary.json ``stages`` (``utils.run.stagetimer``): the wall time, the seconds per stage and
``training_share`` (training-epoch seconds / wall seconds), plus the process time (start-up and the
model load included) and ``target_share`` (the target estimate's seconds / wall). As in bench.py every
repeat runs every defense once, in alternating order, so a slow spell of a shared machine hits all of
them; figures are medians over ``--repeats``. ACC, ASR and RA are reported too: a speed change that moves
them is not a speed change.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # started as a file: re-run as the module with the repository root
    # importable (relative paths in the arguments keep meaning the caller's folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.bench_defense", *sys.argv[1:]], env=env))

from benchmarks.output import bench_main  # noqa: E402

# the README's quickstart (synthetic set): the infected blend CNN and the three defenses on it
ATTACK = ("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "blend", "--attack_mode",
          "all2one", "--n_iters", "5", "--bs", "64", "--lr_C", "0.05", "--schedulerC_milestones", "4",
          "--test_subset", "500")
DEFENSES = {
    "aft": ("pbe_main.py", "--ft_lr", "0.01", "--test_subset", "500"),
    "pbe": ("pbe_main.py", "--progressive", "--ft_lr", "0.01", "--later_lr", "0.003", "--partial_batches", "0",
            "--test_subset", "500"),
    "pud": ("PUD.py", "--test_subset", "500", "--step_epochs", "5", "3", "3", "3", "6", "--step_adv_epochs", "5", "2",
            "1", "1", "1", "--pud_milestones", "15", "--unlearn_epochs", "5", "--mt_epochs", "5", "--unlearn_lambda",
            "0.3", "--poison_fraction", "0.02"),
}
# --tiny: the same scripts and stages on a one-epoch model of 300 images (what the tests and CI can afford)
TINY_ATTACK = ("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "blend",
               "--train_subset", "300", "--test_subset", "100", "--n_iters", "1", "--bs", "64", "--lr_C", "0.05")
TINY_FAST = ("--test_subset", "100", "--eval_steps", "2", "--target_images", "100")
TINY_DEFENSES = {
    "aft": ("pbe_main.py", "--aft_epochs", "2", "--adv_epochs", "1", "--extra_ratio", "0.2", *TINY_FAST),
    "pbe": ("pbe_main.py", "--progressive", "--rounds", "2", "--round_epochs", "1", "--top_rates", "0.5", *TINY_FAST),
    "pud": ("PUD.py", "--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0",
            "0", "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6", "--step_pgd_steps", "1", "--top_rates",
            "0.5", "--spectre_min", "5", "--unlearn_epochs", "1", "--mt_epochs", "1", *TINY_FAST),
}
RESULTS = ("clean_acc", "asr", "robust_acc")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_defense", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="an infected model.pt to defend (default: train the README's "
                                                  "blend CNN first)")
    p.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    p.add_argument("--repeats", type=int, default=1, help="every figure is the median of this many repeats")
    p.add_argument("--threads", type=int, default=None, help="--threads of every script (and OMP_NUM_THREADS)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny settings (a smoke run of the same pipeline)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more flags for every defense (last; e.g. --extra --amp on)")
    p.add_argument("--json", default=None, help="write the results to this file")
    a = p.parse_args(argv)
    if a.repeats <= 0:
        p.error("--repeats must be positive")
    return a


def run_script(argv: list[str], threads: int | None) -> float:
    """Run one script as its own process from the repository root; returns its process seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        argv = [*argv, "--threads", str(threads)]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def one_run(name: str, a, model: str, out: str) -> dict:
    script, *flags = (TINY_DEFENSES if a.tiny else DEFENSES)[name]
    proc = run_script([script, "--model_path", model, *flags, "--device", a.device, "--out_dir", out, "--overwrite",
                       *a.extra], a.threads)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    st = s["stages"]
    return {"process": proc, "wall": st["wall"], "training_share": st["training_share"],
            "target_share": st["seconds"].get("target_estimate", 0.0) / st["wall"],
            "unattributed": st["unattributed"], "stages": st["seconds"],
            "final": {k: s["final"].get(k) for k in RESULTS}, "target": s.get("target")}


def median_record(runs: list[dict]) -> dict:
    med = statistics.median
    names = sorted({k for r in runs for k in r["stages"]})
    out = {k: round(med(r[k] for r in runs), 4) for k in ("process", "wall", "training_share", "target_share",
                                                          "unattributed")}
    out["stages"] = {k: round(med(r["stages"].get(k, 0.0) for r in runs), 3) for k in names}
    out["final"] = runs[-1]["final"]
    target = runs[-1]["target"]
    if target:
        out["target"] = {k: target.get(k) for k in ("estimate", "used", "images", "images_planned", "vote_share",
                                                    "sequential") if k in target}
    out["per_repeat"] = {k: [round(r[k], 3) for r in runs] for k in ("wall", "training_share")}
    return out


def run(a) -> dict:
    work = a.work or tempfile.mkdtemp(prefix="bench-defense-")
    try:
        model = a.model
        attack_seconds = None
        if model is None:
            out = os.path.join(work, "attack")
            attack_seconds = run_script([*(TINY_ATTACK if a.tiny else ATTACK), "--device", a.device, "--out_dir", out,
                                         "--overwrite"], a.threads)
            model = os.path.join(out, "model.pt")
        runs = {n: [] for n in a.defenses}
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        for r in range(a.repeats):
            order = a.defenses if r % 2 == 0 else list(reversed(a.defenses))
            for name in order:
                runs[name].append(one_run(name, a, os.path.abspath(model), os.path.join(work, f"{name}-{r}")))
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"defenses": {n: median_record(v) for n, v in runs.items()}, "repeats": a.repeats, "tiny": a.tiny,
            "threads": a.threads, "device": a.device, "extra": a.extra, "attack_seconds": attack_seconds,
            "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def table(res: dict) -> str:
    lines = [f"medians of {res['repeats']} repeat(s){' (tiny)' if res['tiny'] else ''}, threads {res['threads']}",
             f"{'defense':<8} {'wall s':>8} {'process s':>9} {'train share':>11} {'target share':>12}  stages (s)"]
    for name, d in res["defenses"].items():
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(d["stages"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{name:<8} {d['wall']:>8.1f} {d['process']:>9.1f} {d['training_share']:>11.3f} "
                     f"{d['target_share']:>12.3f}  {split}; unattributed {d['unattributed']:.1f}")
        lines.append(f"{'':<8} final " + " ".join(f"{k} {v:.4f}" for k, v in d["final"].items() if v is not None))
    return "\n".join(lines)


def main(argv=None) -> dict:
    return bench_main(parse, run, table, argv)


if __name__ == "__main__":
    main()
