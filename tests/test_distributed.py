"""Data-parallel training (utils/distributed.py) on CPU with the gloo backend.

A one-process and a two-process run of the same seed cannot end equal: each rank normalises with
BatchNorm statistics of its half-batch (there is no SyncBatchNorm on CPU) and the averaged gradient is
summed in another order, so after a few epochs of a tiny model their numbers differ by an amount that
depends on the CPU. The subprocess tests therefore assert what is exact (the figures before any
training, robust-accuracy and target-vote counts, how many samples each rank trained on, the same
filtering, one writer) and, for the end result, a property both runs must have on any machine (the
backdoor removed, the clean task kept), with a wide margin. The exactness of the sharding and of the
gradient averaging is checked in-process on a BatchNorm-free model, to float rounding.
"""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from conftest import NO_FIGURES, ROOT, cli

COMMON = ["--dataset", "synthetic", "--arch", "cnn", "--train_subset", "400", "--test_subset", "200", "--n_iters", "1",
          "--bs", "64", "--lr_C", "0.05", "--device", "cpu", "--seed", "3", *NO_FIGURES]


def _run(argv, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _clean_exit(r):
    """Exit 0, and no rank left a DDP wrapper alive at the group's end (it can abort the process at exit)."""
    assert r.returncode == 0, r.stderr[-3000:]
    assert "still referenced when the process group was destroyed" not in r.stderr, r.stderr[-3000:]


def _torchrun(args, env_extra=None):
    return _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "train_blend.py", *args], env_extra)


@pytest.mark.slow
def test_torchrun_shares_the_epoch_rank_0_alone_writes_and_a_signal_on_one_rank_resumes_to_the_same_result(tmp_path):
    """An uninterrupted 2-process attack: each rank trains on half of every epoch, rank 0 alone prints and writes
    (the plain model, the one-process run's poisoned set). Then SIGTERM reaches rank 1 only (mid epoch 2): both
    ranks stop at the same batch (none hangs in a collective), rank 0 keeps the state of epoch 1, and a torchrun
    --resume ends where the uninterrupted run ended. (One test: each torchrun start costs seconds.)"""
    args = [*COMMON, "--n_iters", "2", "--train_subset", "256", "--test_subset", "100"]
    full, cut, one_dir = tmp_path / "full", tmp_path / "cut", tmp_path / "one"
    r = _torchrun([*args, "--figures", "--out_dir", str(full)])
    _clean_exit(r)
    # rank 0 alone printed and wrote: one start line, one line per epoch, one metrics line per epoch
    assert r.stdout.count("attack: ") == 1 and r.stdout.count("epoch 1/2") == 1, r.stdout
    for f in ("model.pt", "summary.json", "args.json", "curves.png", "samples.png"):
        assert (full / f).stat().st_size > 0
    r1 = _run(["train_blend.py", *args, "--out_dir", str(one_dir)], {"OMP_NUM_THREADS": "1"})
    _clean_exit(r1)
    ck = torch.load(full / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # the plain model, not the DDP wrapper
    one = torch.load(one_dir / "model.pt", weights_only=False)
    assert torch.equal(ck["poisoned_indices"], one["poisoned_indices"])  # the same poisoned training set
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((one_dir / "summary.json").read_text())
    assert a["train_size"] == b["train_size"] == 256 and a["test_size"] == b["test_size"] == 100
    assert 0 < a["final"]["loss"] < 10 and 0 <= a["final"]["clean_acc"] <= 1
    # each process trained on its half of every epoch (256 images, global batch 64: 4 steps of 32 per rank)
    seen = [[json.loads(x)["images"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, one_dir)]
    assert seen == [[128, 128], [256, 256]], seen

    r = _torchrun([*args, "--out_dir", str(cut)], {"PUD_INJECT_SIGTERM_AT": "2:1", "PUD_INJECT_RANK": "1"})
    assert r.returncode != 0
    assert "interrupted (SIGTERM) at attack epoch 2, batch 1" in r.stderr, r.stderr[-3000:]
    assert (cut / "state.pt").exists() and not (cut / "summary.json").exists()
    assert torch.load(cut / "state.pt", weights_only=False)["position"] == "epoch 1"
    r = _torchrun([*args, "--out_dir", str(cut), "--resume"])
    _clean_exit(r)
    assert not (cut / "state.pt").exists()
    assert a["final"] == json.loads((cut / "summary.json").read_text())["final"]
    lines = (cut / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    wa = ck["state_dict"]
    wb = torch.load(cut / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_pud_under_torchrun_completes_with_one_writer_and_the_same_filtering(infected_run, tmp_path):
    from test_pud import FAST, TINY

    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    model = str(infected_run / "model.pt")
    # --eval_bs 64: the target vote (200 images), the logits and the robust evaluation have several batches a rank;
    # --unlearn_where always: unlearning and the mean teacher ascend, with the classifier layer held, under DDP too
    args = ["PUD.py", "--model_path", model, *TINY, *FAST, "--eval_bs", "64", "--unlearn_where", "always"]
    r2 = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               *args, "--out_dir", str(ddp_dir)])
    _clean_exit(r2)
    assert r2.stdout.count("step 1: poison set") == 1, r2.stdout
    r1 = _run([*args, "--out_dir", str(one_dir)], {"OMP_NUM_THREADS": "1"})
    _clean_exit(r1)
    a = json.loads((ddp_dir / "summary.json").read_text())
    b = json.loads((one_dir / "summary.json").read_text())
    # before any training both see the same model: the same target vote, the same SPECTRE removal and class split
    # (its non-target confidences come from the sharded logits) and the same initial robust accuracy
    assert a["target"] == b["target"] and a["spectre_initial"] == b["spectre_initial"] and a["initial"] == b["initial"]
    assert [st["step"] for st in a["steps"]] == [0, 1] and a["unlearning"]["epochs"] == 1
    assert a["unlearning"]["classifier_layer"] == "held" and a["mean_teacher"]["ascent"]["classifier_layer"] == "held"
    # the step-0 extra set is drawn before any training: the same samples in both runs
    assert a["steps"][0]["extra_size"] == b["steps"][0]["extra_size"]
    assert a["steps"][0]["extra_poison_share"] == b["steps"][0]["extra_poison_share"]
    for s in (a, b):  # both runs keep the clean task (a broken rank would drag the shared model down)
        assert s["final"]["clean_acc"] >= s["initial"]["clean_acc"] - 0.2, (s["initial"], s["final"])
    # every stage is sharded: each rank trains on half of its run's set (steps, unlearning, mean teacher)
    for summary, run_dir, ranks in ((a, ddp_dir, 2), (b, one_dir, 1)):
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        unlearn_set = summary["unlearning"]["extra_size"]
        expected = {("step", st["step"]): st.get("extra_size_after_spectre", st["extra_size"]) for st in summary["steps"]}
        expected[("stage", "unlearning")] = unlearn_set
        expected[("stage", "mean_teacher")] = unlearn_set - summary["mt_refresh"]["dropped"]
        for (key, value), size in expected.items():
            seen = [r["images"] for r in recs if r.get(key) == value and "images" in r]
            assert len(seen) == 1 and abs(seen[0] - size / ranks) <= 1, (key, value, ranks, seen, size)


# --eval_bs 64: 4 test batches, so each process attacks 2 in the robust evaluation (sharded, summed)
AFT = ["--aft_epochs", "2", "--adv_epochs", "1", "--extra_ratio", "0.2", "--bs", "64", "--ft_lr", "0.01",
       "--test_subset", "200", "--eval_steps", "2", "--eval_bs", "64", "--device", "cpu", *NO_FIGURES]


@pytest.fixture(scope="module")
def sig_infected_run(tmp_path_factory):
    """A SIG-infected CNN: paper AFT removes SIG within two epochs (0.90 -> 0.00 measured, 1 and 2 processes),
    unlike the session's patch model, so the end result can be checked as a property of both runs."""
    import train_blend

    out = tmp_path_factory.mktemp("sig") / "attack"
    assert cli(train_blend.main, "--dataset", "synthetic", "--arch", "cnn", "--trigger_type", "sig", "--train_subset",
               "2000", "--test_subset", "500", "--n_iters", "4", "--bs", "64", "--lr_C", "0.05",
               "--schedulerC_milestones", "3", "--device", "cpu", "--no-eval_robust", *NO_FIGURES,
               "--out_dir", out) == 0
    return out


@pytest.mark.slow
def test_aft_under_torchrun_removes_the_backdoor_as_one_process_does(sig_infected_run, tmp_path):
    """AFT data-parallel (PGD on each rank's shard, DDP gradients): completes, rank 0 alone writes, each rank
    fine-tunes on half of the extra set, and both runs remove the backdoor."""
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    model = str(sig_infected_run / "model.pt")
    r2 = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "pbe_main.py", "--model_path", model, *AFT, "--out_dir", str(ddp_dir)])
    _clean_exit(r2)
    r1 = _run(["pbe_main.py", "--model_path", model, *AFT, "--out_dir", str(one_dir)], {"OMP_NUM_THREADS": "1"})
    _clean_exit(r1)
    assert r2.stdout.count("aft: ") == 1 and r2.stdout.count("aft epoch 2/2") == 1, r2.stdout
    a = json.loads((ddp_dir / "summary.json").read_text())
    b = json.loads((one_dir / "summary.json").read_text())
    # same infected model, same evaluation (sharded and summed vs one pass), robust accuracy included
    assert a["initial"] == b["initial"] and "robust_acc" in a["initial"]
    assert a["settings"]["extra_size"] == b["settings"]["extra_size"] == 400
    assert a["initial"]["asr"] >= 0.6  # the model is infected ...
    for s in (a, b):  # ... and both runs remove the backdoor (measured 0.00 in both), far below where they began
        assert s["final"]["asr"] <= 0.2, (s["initial"], s["final"])
    for run_dir, ranks in ((ddp_dir, 2), (one_dir, 1)):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["adversarial"] for r in recs] == [True, False]
        assert [r["images"] for r in recs] == [400 // ranks] * 2  # each rank its half of the extra set


@pytest.mark.slow
def test_progressive_pbe_under_torchrun_completes_with_one_writer(infected_run, tmp_path):
    out = tmp_path / "pbe"
    r = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
              "pbe_main.py", "--model_path", str(infected_run / "model.pt"), "--progressive", "--rounds", "2",
              "--round_epochs", "1", "--top_rates", "0.5", "--target_images", "200", "--bs", "64",
              "--test_subset", "200", "--eval_steps", "2", "--device", "cpu", *NO_FIGURES, "--out_dir", str(out)])
    _clean_exit(r)
    assert r.stdout.count("round 1: extra set") == 1, r.stdout
    s = json.loads((out / "summary.json").read_text())
    r0 = s["rounds"][0]  # half of every label's samples, none the filter removed or the detector flagged
    assert [rd["round"] for rd in s["rounds"]] == [0, 1] and 0 < r0["next_extra_size"] <= 1000
    assert r0["next_extra_filter_removed"] == 0


def test_global_batch_size_must_divide_by_the_process_count(tmp_path, monkeypatch, capsys):
    """Checked with the settings, before the process group: as torchrun's 2 processes see it (WORLD_SIZE 2)."""
    import train_blend

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(train_blend.main, *COMMON, "--bs", "63", "--out_dir", tmp_path / "x") == 2
    assert "--bs 63 is the global batch size and must divide by the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----- exact check of the helpers, in-process ranks ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(world: int, rank: int, port: int, out):
    """Two epochs of SGD on a BatchNorm-free model through the attack's helpers; returns weights and metrics."""
    import torch.nn as nn

    from utils.run import distributed as dist
    from utils.data.datasets import make_synthetic
    from utils.evaluation import evaluate
    from utils.training import train_epoch

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    device = dist.init(torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10))
    net = dist.wrap(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data, test = make_synthetic(250, seed=1), make_synthetic(101, seed=2)  # 101: unequal test shards (50 + 51)
    gen = torch.Generator().manual_seed(0)
    stats = []
    for _ in range(2):
        stats.append(train_epoch(net, opt, dist.epoch_batches(data, 50, gen), generator=gen))  # averaged over ranks
    ev = evaluate(model, test, batch_size=16)
    result = {"weights": [p.detach().numpy().copy() for p in model.parameters()], "stats": stats, "eval": ev}
    if rank == 0 and out is not None:
        out.put(result)
    del net  # a wrapper alive when the group goes is freed later, and gloo can abort the process then
    if world > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a wrapper still alive at the group's end fails the worker
            dist.finish()
    return result


def _worker(rank, world, port, q):
    _train(world, rank, port, q)


@pytest.mark.slow
def test_ddp_helpers_match_one_process_exactly_without_batchnorm():
    one = _train(1, 0, 0, None)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = mp.spawn(_worker, args=(2, _free_port(), q), nprocs=2, join=False)
    two = q.get(timeout=120)  # read before joining: a child cannot exit while its queue data is unread
    while not procs.join():
        pass
    # 250 images, global batch 50: each rank takes 25 of every 50 consecutive positions of the same permutation
    for a, b in zip(one["weights"], two["weights"]):
        assert abs(a - b).max() < 1e-5, abs(a - b).max()
    for a, b in zip(one["stats"], two["stats"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["acc"] == pytest.approx(b["acc"], abs=1e-9)
    assert one["eval"] == two["eval"]


def test_sharded_training_set_logits_sum_to_the_one_process_logits(monkeypatch):
    """``all_logits`` under torchrun: each rank fills every N-th batch, zeros elsewhere; the sum is the full set."""
    from models import build_model
    from utils.run import distributed as dist
    from utils.data.datasets import make_synthetic
    from utils.evaluation import all_logits
    from utils.data.poison import BackdoorSpec, PoisonedTrainSet
    from utils.data.triggers import build_trigger

    torch.manual_seed(0)
    data = make_synthetic(130, seed=4)
    poisoned = PoisonedTrainSet(data, BackdoorSpec(build_trigger("patch", (3, 32, 32)), "all2one", 0, 10), "fixed", 0.1,
                                torch.arange(0, 130, 10))
    model = build_model("cnn", 10, 3).eval()
    one = all_logits(model, poisoned, batch_size=32)
    assert one.shape == (130, 10) and one.abs().sum(1).min() > 0
    parts = []
    for r in range(2):
        monkeypatch.setattr(dist, "owns_batch", lambda b, r=r: b % 2 == r)  # rank r of 2; the sum is done here
        parts.append(all_logits(model, poisoned, batch_size=32))
    owned = torch.arange(130) // 32 % 2  # batches 0, 2, 4 (rows 0-31, 64-95, 128-129) are rank 0's
    for r, part in enumerate(parts):
        assert torch.equal(part[owned == r], one[owned == r]) and not part[owned != r].any()
    assert torch.equal(parts[0] + parts[1], one)


def test_a_rank_other_than_0_writes_nothing(tmp_path, monkeypatch):
    """Every file of a run goes through rank 0 (``atomic_write``, ``RunDir``, the plots, the folder lock): a whole
    run as rank 1 of a one-process "group" completes and leaves no trace on disk."""
    import train_blend
    from conftest import TINY_ATTACK
    from utils.run import distributed as dist

    monkeypatch.setattr(dist, "rank", lambda: 1)
    out = tmp_path / "rank1"
    assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "1", "--out_dir", out) == 0
    assert not out.exists() and not list(tmp_path.iterdir())
