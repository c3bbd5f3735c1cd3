"""Speed benchmark: model-only training, the real attack-training pipeline, PGD, evaluation, device peak.

Run it as a file or as a module (the file form re-runs itself as the module from the repository root)::

    python benchmarks/bench.py --arch cnn
    python -m benchmarks.bench --arch cnn
    python -m benchmarks.bench --arch preactresnet18 --bs 64 --json bench-preact.json

Everything is measured on 32x32x3, 10-class synthetic data on the device ``--device`` finds, with
CIFAR-10's augmentation (crop pad 5, rotation 10, flip), a blend trigger and 10% fixed poisoning:

- ``model_train_ips``: forward + backward + SGD step on random tensors already on the device;
- ``pipeline_train_ips``: ``utils.training.train_epoch`` over ``PoisonedTrainSet.batches`` (device
  data, augmentation, poisoning, forward, backward, step) -- the step ``train_blend.py`` runs;
- ``reference_train_ips``: the reference-style baseline of ``benchmarks/reference.py`` (PIL +
  ToTensor DataLoader, per-batch poisoning, kornia-style augmentation after the transfer, NCHW fp32);
- ``pgd_ips`` and ``pgd_cost_ratio``: our PGD (7 steps) per image, and the time of one PGD batch over
  the time of one model training step;
- ``eval_ips``: ``utils.evaluation.evaluate`` test images per second (each image is evaluated clean
  and with the trigger);
- ``matmul_gflops``: a large fp32 matmul; ``train_gflop_per_image`` = 3 x the forward FLOPs counted by
  ``FlopCounterMode``; ``mfu`` = pipeline training FLOP/s / matmul FLOP/s (``model_mfu``: model-only).
  ``conv_gflops`` is a large 3x3 convolution through the same library the models use; where it beats
  the matmul (MKL's sgemm on AMD CPUs does not reach the vector peak), ``mfu`` can exceed 1, and
  ``mfu_vs_best_kernel`` divides by the faster of the two instead.

The speed switches are the toolkit's own (``models.speed.prepare_model``): ``--channels_last``,
``--amp`` (bf16 autocast; auto = CUDA and CPUs with AMX-BF16 or AVX512-BF16) and ``--compile`` (torch.compile), as in config.py.

Each repeat measures every figure once, in alternating order, so a slow spell of a shared machine
hits all of them; figures are medians over ``--repeats``, and ratios are medians of the per-repeat
ratios (paired, so drift between repeats cancels).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):
    # Started as a file (python benchmarks/bench.py): the project's modules live at the repository root,
    # so run this same module from there, with a --json path made absolute against the caller's folder.
    import subprocess

    def _absolute_json(args: list[str]) -> list[str]:
        out = []
        for i, a in enumerate(args):
            if i > 0 and args[i - 1] == "--json":
                a = os.path.abspath(a)
            elif a.startswith("--json="):
                a = "--json=" + os.path.abspath(a[len("--json="):])
            out.append(a)
        return out

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.bench", *_absolute_json(sys.argv[1:])], cwd=_root))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import reference  # noqa: E402
from benchmarks.output import bench_main  # noqa: E402
from models import ARCHS, build_model, eval_mode  # noqa: E402
from utils.adversarial import PGD  # noqa: E402
from utils.data.augment import Augment  # noqa: E402
from utils.data.datasets import make_synthetic  # noqa: E402
from utils.evaluation import evaluate  # noqa: E402
from utils.data.poison import BackdoorSpec, PoisonedTrainSet, draw_poison_indices  # noqa: E402
from models.speed import SpeedSettings, amp_dtype, prepare_model  # noqa: E402
from utils.run.runtime import pick_device  # noqa: E402
from utils.training import make_optimizer, train_epoch  # noqa: E402
from utils.data.triggers import build_trigger  # noqa: E402

SHAPE = (3, 32, 32)
CLASSES = 10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def matmul_gflops(device, n: int, reps: int = 3) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up (allocation, library init)
    t = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n ** 3 * reps / t / 1e9


def conv_gflops(device, cl: bool, reps: int = 3) -> float:
    """A large 3x3 convolution (64 x 256 x 16 x 16 -> 256 channels) through the DNN library."""
    x = torch.randn(64, 256, 16, 16, device=device)
    w = torch.randn(256, 256, 3, 3, device=device)
    if cl:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    F.conv2d(x, w, padding=1)
    t = timed(lambda: [F.conv2d(x, w, padding=1) for _ in range(reps)], device)
    return 2 * 64 * 256 * 256 * 9 * 16 * 16 * reps / t / 1e9


def forward_flops(model, device, cl: bool) -> float:
    """Forward FLOPs per image (convolutions, matmuls; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, *SHAPE, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="cnn", choices=sorted(ARCHS))
    p.add_argument("--bs", type=int, default=128, help="batch size")
    p.add_argument("--batches", type=int, default=None, help="batches per training measurement (default: 10 for cnn, 2 otherwise)")
    p.add_argument("--repeats", type=int, default=5, help="every figure is the median of this many repeats")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto", help="as in config.py (auto: on)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast, as in config.py (auto: CUDA and CPUs with native bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as in config.py")
    p.add_argument("--pgd_steps", type=int, default=7)
    p.add_argument("--eval_bs", type=int, default=512)
    p.add_argument("--ref_workers", type=int, default=None,
                   help="DataLoader workers of the reference baseline (default: 0 on CPU, measured fastest on the "
                        "2-core test machine; min(6, CPUs) on a GPU, the paper code's 6)")
    p.add_argument("--ref_channels_last", choices=("off", "same"), default="off",
                   help="off: the reference model is NCHW as in the paper code; same: as ours (isolates the data path)")
    p.add_argument("--matmul_n", type=int, default=None, help="matmul size (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this file")
    a = p.parse_args(argv)
    if a.batches is None:
        a.batches = 10 if a.arch == "cnn" else 2
    if min(a.bs, a.batches, a.repeats) <= 0:
        p.error("--bs, --batches and --repeats must be positive")
    return a


def run(a: argparse.Namespace) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    speed = SpeedSettings(channels_last=a.channels_last, amp=a.amp, compile=a.compile)
    cl = speed.use_channels_last
    torch.manual_seed(a.seed)
    n_img = a.bs * a.batches

    def model_copy(channels_last: bool):
        torch.manual_seed(a.seed)
        m = build_model(a.arch, CLASSES, SHAPE[0], MEAN, STD).to(device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    # our pipeline: the objects train_blend.py builds, with its speed switches
    model = prepare_model(model_copy(False), speed, device)
    opt = make_optimizer(model, 0.01)
    train = make_synthetic(n_img, seed=1).to(device)
    test = make_synthetic(n_img, seed=2).to(device)
    trigger = build_trigger("blend", SHAPE, seed=a.seed, blend_alpha=0.1)
    backdoor = BackdoorSpec(trigger, "all2one", 0, CLASSES)
    pidx, nidx = draw_poison_indices(n_img, 0.1, a.seed)
    poisoned = PoisonedTrainSet(train, backdoor, "fixed", 0.1, pidx, nidx)
    augment = Augment(5, 10.0, True)
    gen = torch.Generator().manual_seed(a.seed)
    attack = PGD(eps=6 / 255, alpha=1.2 / 255, steps=a.pgd_steps, random_start=False)

    # model only: random tensors already on the device
    xr = torch.rand(a.bs, *SHAPE, device=device)
    if cl:
        xr = xr.contiguous(memory_format=torch.channels_last)
    yr = torch.randint(0, CLASSES, (a.bs,), device=device)

    def model_step():
        loss = F.cross_entropy(model(xr), yr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def model_train():
        for _ in range(a.batches):
            model_step()

    def pipeline_train():
        train_epoch(model, opt, poisoned.batches(a.bs, shuffle=True, generator=gen, augment=augment), generator=gen,
                    channels_last=cl, desc="bench")

    _, xp, yp = next(test.batches(a.bs))
    if cl:
        xp = xp.contiguous(memory_format=torch.channels_last)

    def pgd_batch():
        attack(model, xp, yp)

    def evaluation():
        evaluate(model, test, backdoor, min(a.eval_bs, n_img), channels_last=cl)

    # reference-style baseline
    ref_workers = a.ref_workers
    if ref_workers is None:
        ref_workers = 0 if device.type == "cpu" else min(6, os.cpu_count() or 1)
    ref_cl = cl and a.ref_channels_last == "same"
    ref_model = model_copy(ref_cl)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    ref_loader = reference.make_loader(train.x, train.y, a.bs, ref_workers, device)
    ref_aug = reference.PostTensorTransform(5, 10.0, True)
    pattern = trigger.tensors["image"]

    def reference_train():
        reference.train_epoch(ref_model, ref_opt, ref_loader, device, pattern, alpha=0.1, pc=0.1, target_label=0,
                              post_transforms=ref_aug)

    mm_n = a.matmul_n or (2048 if device.type == "cpu" else 8192)
    fwd_flops = forward_flops(model, device, cl)
    train_flops = 3 * fwd_flops

    jobs = {"model_train": model_train, "pipeline_train": pipeline_train, "reference_train": reference_train,
            "pgd": pgd_batch, "eval": evaluation, "matmul": lambda: None, "conv": lambda: None}
    for name, fn in jobs.items():  # warm-up: first calls allocate, pick kernels, start workers
        fn()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t = {k: [] for k in jobs}
    mm, cv = [], []
    for r in range(a.repeats):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            if name == "matmul":
                mm.append(matmul_gflops(device, mm_n))
            elif name == "conv":
                cv.append(conv_gflops(device, cl))
            else:
                t[name].append(timed(jobs[name], device))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    med = statistics.median
    per = {
        "model_train_ips": [n_img / s for s in t["model_train"]],
        "pipeline_train_ips": [n_img / s for s in t["pipeline_train"]],
        "reference_train_ips": [n_img / s for s in t["reference_train"]],
        "pgd_ips": [a.bs / s for s in t["pgd"]],
        "eval_ips": [n_img / s for s in t["eval"]],
        "matmul_gflops": mm,
        "conv_gflops": cv,
    }
    ratios = {
        "pipeline_over_model": [p / m for p, m in zip(per["pipeline_train_ips"], per["model_train_ips"])],
        "pgd_cost_ratio": [tp / (tm / a.batches) for tp, tm in zip(t["pgd"], t["model_train"])],
        "speedup_vs_reference": [p / r for p, r in zip(per["pipeline_train_ips"], per["reference_train_ips"])],
        "mfu": [ips * train_flops / 1e9 / g for ips, g in zip(per["pipeline_train_ips"], mm)],
        "model_mfu": [ips * train_flops / 1e9 / g for ips, g in zip(per["model_train_ips"], mm)],
        "mfu_vs_best_kernel": [ips * train_flops / 1e9 / max(g, c) for ips, g, c in zip(per["pipeline_train_ips"], mm, cv)],
    }
    result = {k: round(med(v), 1) for k, v in per.items()}
    result.update({k: round(med(v), 3) for k, v in ratios.items()})
    result.update({
        "fwd_gflop_per_image": round(fwd_flops / 1e9, 4), "train_gflop_per_image": round(train_flops / 1e9, 4),
        "arch": a.arch, "bs": a.bs, "batches": a.batches, "images_per_measurement": n_img, "repeats": a.repeats,
        "pgd_steps": a.pgd_steps, "device": str(device), "threads": torch.get_num_threads(), "channels_last": cl,
        "amp": str(amp_dtype(a.amp, device)).replace("torch.", "") if amp_dtype(a.amp, device) else "off",
        "compile": a.compile,
        "ref_workers": ref_workers, "ref_channels_last": ref_cl, "matmul_n": mm_n,
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "per_repeat": {**{k: [round(x, 2) for x in v] for k, v in per.items()},
                       **{k: [round(x, 4) for x in v] for k, v in ratios.items()}},
    })
    return result


ROWS = [("model_train_ips", "img/s", "forward+backward+SGD on device tensors"),
        ("pipeline_train_ips", "img/s", "train_epoch over PoisonedTrainSet.batches (aug + poison)"),
        ("pipeline_over_model", "", "pipeline / model (target >= 0.9)"),
        ("reference_train_ips", "img/s", "reference-style baseline (PIL DataLoader, per-batch poison)"),
        ("speedup_vs_reference", "x", "pipeline / reference (target >= 1.3)"),
        ("pgd_ips", "img/s", "PGD images per second"),
        ("pgd_cost_ratio", "", "one PGD batch / one training step (target <= 5)"),
        ("eval_ips", "img/s", "evaluate(): test images (clean + triggered) per second"),
        ("matmul_gflops", "GFLOP/s", "large fp32 matmul"),
        ("conv_gflops", "GFLOP/s", "large fp32 3x3 convolution (DNN library)"),
        ("train_gflop_per_image", "GFLOP", "3 x forward FLOPs"),
        ("mfu", "", "pipeline training FLOP/s / matmul FLOP/s"),
        ("model_mfu", "", "model-only training FLOP/s / matmul FLOP/s"),
        ("mfu_vs_best_kernel", "", "pipeline training FLOP/s / max(matmul, conv) FLOP/s")]


def table(res: dict) -> str:
    head = (f"{res['arch']} bs {res['bs']} on {res['device']} ({res['threads']} threads, channels_last "
            f"{'on' if res['channels_last'] else 'off'}, amp {res['amp']}, compile {'on' if res['compile'] else 'off'}); "
            f"medians of {res['repeats']} repeats of {res['images_per_measurement']} images")
    lines = [head, f"{'figure':<22} {'value':>10}  {'unit':<8} meaning", "-" * 100]
    for key, unit, meaning in ROWS:
        if key in res:
            lines.append(f"{key:<22} {res[key]:>10}  {unit:<8} {meaning}")
    if res.get("loadavg_before") is not None:
        lines.append(f"load average before/after: {res['loadavg_before'][0]:.2f} / {res['loadavg_after'][0]:.2f} "
                     f"on {res['cpus']} CPUs")
    return "\n".join(lines)


def main(argv=None) -> dict:
    return bench_main(parse, run, table, argv)


if __name__ == "__main__":
    main()
