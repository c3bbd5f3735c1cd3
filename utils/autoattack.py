"""AutoAttack robust accuracy (Croce & Hein, ICML 2020) through the ``pyautoattack`` package.

``autoattack_accuracy`` runs the *standard* AutoAttack chain at the reference strength on a seeded
subset of a test split: APGD-CE (100 iterations, 1 restart) -> APGD-T (targeted DLR, 100 iterations
x 9 target classes) -> FAB-T (100 iterations x 9 target classes) -> Square (5,000 queries), L∞
ε = 8/255 on [0,1] pixels, each attack run only on the images every earlier attack left correctly
classified. The attacks are the reference code as packaged on PyPI (``pyautoattack``, built by the
library's own ``AutoAttack(version='standard')``, so its settings are the library's); this module
runs the library's ``run_standard_evaluation`` once per component on the previous survivors, which
is the library's own chain split up so that every component's survivors and seconds can be recorded.

It is a complement to our PGD-20 figure (``utils.adversarial.robust_accuracy``), not a replacement:
PGD-20 with a fixed step is an optimistic evaluation, AutoAttack is the usual "can this number be
trusted" check. (torchattacks' ``AutoAttack(version='standard')`` builds APGD/APGD-T/FAB with 10
iterations each and is not used here: on 200 synthetic images its APGD-CE-10 left 5 and 9 images
where APGD-CE-100 left 2 and 8, and its whole chain ended at APGD-CE-100's figure, 2 and 8, where
this chain ended at 2 and 7.)

What this wrapper adds to the library:

* the model is attacked in eval mode, every submodule's train/eval flag is restored afterwards, and
  parameters are frozen during the attack (FAB calls ``backward`` on the logits, which would
  otherwise accumulate ``.grad`` in the weights); for the toolkit's ``NormalizedModel`` the attacks
  run on ``models.folding.attack_view`` (conv->BN folded: same logits to float rounding, about
  twice as fast on CPU), and *every survivor count is decided on the model itself* from the
  examples the library returns, after checking they lie in the ε-box and in [0,1];
* determinism: the library reseeds torch's global generator (``torch.random.manual_seed(seed)``)
  at each attack; here it runs inside ``torch.random.fork_rng``, so the caller's random stream is
  untouched, and the result depends only on ``seed``, the model and the images;
* the image subset is ``randperm(len(test), generator seeded with seed)[:n_images]`` (sorted), the
  same images for every model given the same seed, so defended and infected models are compared on
  the same images;
* the library's ``check_dynamic`` uses ``sys.settrace(None)``, which would switch off a debugger's
  or coverage's tracer; the caller's trace function is put back after each call. The library's
  warnings (randomised / dynamic defence, probabilities instead of logits, Square better than the
  white-box attacks) are collected into the record's ``flags``;
* a model whose clean accuracy is low (or zero) is fine: only correctly classified images are
  attacked, and components with no survivors left are recorded with 0 seconds;
* models that run bf16 autocast inside (``amp_dtype``) return float32 logits, which is what the
  library's losses need; inputs are float32 in [0,1] (checked).

``version="quick"`` runs APGD-CE + APGD-T only (cheaper; it found everything the last two found on
the models measured, but that is not guaranteed); the
default is the reference strength. ``n_iter`` / ``n_queries`` override the iteration and query
counts (tests only: the record's ``reference_strength`` is then False).

Cost (this project's 2-core CPU shared with other jobs, one thread, the synthetic ``cnn``): APGD-CE
0.25-0.45 s per image; per image that reaches them still robust, APGD-T 2-3 s, FAB-T 4-6 s, Square
(5,000 queries) about 8 s (5-17 s each when only 2 images are left: small batches use the CPU badly).
So a 200-image pass is about 50-90 s plus about 15 s per robust image: 150 s for an infected CNN
(2 robust), 170 s after AFT (7 robust). Two threads on the busy CPU made the same pass 8x slower.

Single process: under torchrun call it on one rank only (it does not split the images). Between
components it checks ``utils.run.interrupt`` (one process only), so a signal stops a long pass there.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import time

import torch
import torch.nn as nn
from torch import Tensor

from models import eval_mode
from models.folding import attack_view
from utils.run import distributed as dist, interrupt
from utils.settings import checked_int

__all__ = ["LIBRARY", "VERSIONS", "DEFAULT_IMAGES", "REFERENCE", "autoattack_accuracy", "final_robustness",
           "library_version", "subset_indices"]

LIBRARY = "pyautoattack"
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),  # Croce & Hein's standard AutoAttack
    "quick": ("apgd-ce", "apgd-t"),
}
REFERENCE = {"n_iter": 100, "n_queries": 5000, "target_classes": 9}  # the reference strength (L∞ standard version)
DEFAULT_IMAGES = 1000
_LOGGER = "auto-attack"  # the library's logger name


def library_version() -> str:
    """``"pyautoattack <version>"``; raises ImportError with an install hint if the package is missing."""
    try:
        import pyautoattack
    except ImportError as e:
        raise ImportError("AutoAttack needs the pyautoattack package: pip install -r requirements.txt") from e
    try:
        from importlib.metadata import version
        v = version(LIBRARY)
    except Exception:  # not installed as a distribution (e.g. vendored): fall back to the module attribute
        v = getattr(pyautoattack, "__version__", "unknown")
    return f"{LIBRARY} {v}"


def subset_indices(n_total: int, n_images: int | None, seed: int) -> Tensor:
    """The evaluated images: a seeded random ``n_images`` of ``range(n_total)`` (all if None or larger), sorted."""
    if n_images is None or n_images >= n_total:
        return torch.arange(n_total)
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n_images].sort().values


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """Parameters do not require grad inside (no weight gradient is computed or accumulated); restored on exit."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _library_warnings():
    """Collect the library logger's warnings (its checks) into a list; restore the logger's state on exit."""
    logger = logging.getLogger(_LOGGER)
    seen: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg not in seen:
                seen.append(msg)

    handler = _Collect(level=logging.WARNING)
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # the warnings go into the record (and are printed once by the caller if wanted)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


@contextlib.contextmanager
def _threads(n: int | None):
    """``torch.set_num_threads(n)`` inside (None: unchanged); the previous count is restored on exit."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _keep_trace():
    """Put back the caller's ``sys.settrace`` function (the library's dynamic-defence check clears it)."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


def _set_apgd_iterations(apgd, n_iter: int) -> None:
    """Set an APGD attack's iteration count together with the checkpoint schedule its constructor derives from it."""
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def _build(net: nn.Module, eps: float, seed: int, device, num_classes: int, n_iter: int, n_queries: int):
    """The library's standard-version AutoAttack on ``net`` with the given counts; returns (adversary, targets)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(net, norm="Linf", eps=eps, seed=seed, device=device, version="standard")
    aa.verbose = False  # progress lines off; the checks' warnings still reach the logger
    targets = min(REFERENCE["target_classes"], num_classes - 1)
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    if n_iter != aa.apgd.n_iter or n_iter != aa.apgd_targeted.n_iter:
        _set_apgd_iterations(aa.apgd, n_iter)
        _set_apgd_iterations(aa.apgd_targeted, n_iter)
    aa.fab.n_iter = n_iter
    aa.square.n_queries = n_queries
    return aa, targets


def _settings(aa, name: str) -> dict:
    """What the library's attack object for ``name`` is set to (read back, so the record says what ran)."""
    if name == "apgd-ce":
        return {"iterations": aa.apgd.n_iter, "restarts": aa.apgd.n_restarts}
    if name == "apgd-t":
        return {"iterations": aa.apgd_targeted.n_iter, "target_classes": aa.apgd_targeted.n_target_classes}
    if name == "fab-t":
        return {"iterations": aa.fab.n_iter, "target_classes": aa.fab.n_target_classes}
    return {"queries": aa.square.n_queries, "p_init": aa.square.p_init}


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Boolean per image: ``model`` classifies it as ``y`` (batched)."""
    out = [model(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size] for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def _collect(test, idx: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for _, x, y in test.batches(batch_size, indices=idx):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def autoattack_accuracy(model: nn.Module, test, eps: float = 8 / 255, n_images: int | None = DEFAULT_IMAGES,
                        seed: int = 0, batch_size: int = 250, version: str = "standard",
                        n_iter: int | None = None, n_queries: int | None = None,
                        num_threads: int | None = None) -> dict:
    """AutoAttack (L∞) robust accuracy of ``model`` on a seeded subset of ``test``.

    ``test`` is anything with ``__len__`` and ``batches(batch_size, indices=...)`` yielding (idx, x, y),
    x float in [0,1]. ``n_images`` images (all if None) drawn by ``subset_indices(len(test), n_images,
    seed)``; ``seed`` also seeds the attacks. ``version``: "standard" (APGD-CE, APGD-T, FAB-T, Square)
    or "quick" (APGD-CE, APGD-T). ``n_iter`` (APGD / FAB iterations, default 100) and ``n_queries``
    (Square, default 5000) are for tests; the defaults are the reference strength. ``num_threads`` sets
    torch's intra-op threads for the pass (restored afterwards; None leaves them): after APGD-CE only a
    few images are left, and on a shared CPU a 2-thread forward of a handful of images was measured 10x
    slower than a 1-thread one (an OpenMP thread waiting for a busy core), so ``num_threads=1`` is the
    steadier choice there.

    Returns ``{"autoattack_acc": robust images / n, "autoattack_eval": {"images", "eps", "norm", "seed",
    "version", "library", "clean_correct", "attacks": [{"name", the settings read back from the library's
    attack object ("iterations", "restarts" | "target_classes"; Square: "queries", "p_init"),
    "robust_after", "seconds"}, ...], "reference_strength", "attacked", "subset", "threads", "flags"}}``.
    ``robust_after`` counts the images still correctly classified after that component (and all earlier
    ones; decided on ``model`` itself); the last one equals ``autoattack_acc * images``. ``subset`` is a
    digest of the evaluated indices (equal digests: the same images).
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(VERSIONS)}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    seed = checked_int("seed", seed, lo=0)
    batch_size = checked_int("batch_size", batch_size)
    if n_images is not None:
        n_images = checked_int("n_images", n_images)
    n_iter = REFERENCE["n_iter"] if n_iter is None else checked_int("n_iter", n_iter)
    n_queries = REFERENCE["n_queries"] if n_queries is None else checked_int("n_queries", n_queries)
    if num_threads is not None:
        num_threads = checked_int("num_threads", num_threads)
    lib = library_version()
    attacks = VERSIONS[version]

    idx = subset_indices(len(test), n_images, seed)
    if idx.numel() == 0:
        raise ValueError("the test split is empty")
    with torch.inference_mode(False):
        x, y = _collect(test, idx, batch_size)
        x, y = x.detach().clone().float(), y.detach().clone().long()
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"AutoAttack needs [0,1] pixels (the model normalises inside); got values in [{lo:.3g}, {hi:.3g}]")
    n = int(y.numel())
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else x.device
    rng_devices = [device] if device.type == "cuda" else []

    records = []
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), _frozen_parameters(model), \
            torch.random.fork_rng(devices=rng_devices), _threads(num_threads), _library_warnings() as flags:
        net = attack_view(model)
        alive = _correct(model, x.to(device), y.to(device), batch_size).to(x.device)
        clean = int(alive.sum())
        threads = torch.get_num_threads()
        num_classes = int(model(x[:1].to(device)).shape[1])
        if "apgd-t" in attacks and num_classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {num_classes}")
        aa, _ = _build(net, eps, seed, device, num_classes, n_iter, n_queries)
        for name in attacks:
            if dist.world_size() == 1:  # a signal (under handle_signals) stops the pass between components
                interrupt.check(f"AutoAttack, before {name}")
            t0 = time.perf_counter()
            todo = alive.nonzero().flatten()
            if todo.numel():
                aa.attacks_to_run = [name]
                xs, ys = x[todo], y[todo]
                with _keep_trace():
                    x_adv, _ = aa.run_standard_evaluation(xs, ys, batch_size=batch_size)
                x_adv = x_adv.detach().to(x.device)
                gap = (x_adv - xs).abs().flatten(1).amax(1)
                if not torch.isfinite(x_adv).all() or (gap > eps + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
                    raise RuntimeError(f"{lib} {name} returned examples outside the ε-box or [0,1] "
                                       f"(max L∞ distance {gap.max().item():.6f}, ε {eps:.6f})")
                # decided on the model itself, not on the attack view / the library's own flags
                still = _correct(model, x_adv.to(device), ys.to(device), batch_size).to(x.device)
                alive[todo[~still]] = False
            rec = {"name": name, **_settings(aa, name)}
            rec.update(robust_after=int(alive.sum()), seconds=round(time.perf_counter() - t0, 3))
            records.append(rec)
        flags = list(flags)
    robust = int(alive.sum())
    reference = version == "standard" and all(
        r.get("iterations", REFERENCE["n_iter"]) == REFERENCE["n_iter"]
        and r.get("queries", REFERENCE["n_queries"]) == REFERENCE["n_queries"]
        and r.get("target_classes", REFERENCE["target_classes"]) == REFERENCE["target_classes"] for r in records)
    digest = hashlib.sha1(idx.to(torch.int64).numpy().tobytes()).hexdigest()[:12]
    return {"autoattack_acc": robust / n,
            "autoattack_eval": {"images": n, "eps": eps, "norm": "linf", "seed": seed, "version": version,
                                "library": lib, "clean_correct": clean, "attacks": records,
                                "reference_strength": reference,
                                "attacked": "model" if net is model else "folded-BN attack view",
                                "subset": digest, "threads": threads, "flags": flags}}


def final_robustness(model: nn.Module, test, settings, seed: int, batch_size: int, channels_last: bool,
                     amp: str | None = None, earlier: dict | None = None) -> dict:
    """A run's final robustness figures: PGD (``settings``: a ``RobustEvalSettings``; taken from an ``earlier``
    record of the same evaluation, ``robust_eval``) and, if it asks for ``autoattack_images``, AutoAttack at radius
    ``eval_eps`` on that many images seeded by ``seed`` (the same images for every run of the seed)."""
    from utils.adversarial import robust_eval

    out = robust_eval(model, test, settings, seed, batch_size, channels_last, amp, earlier)
    if settings.autoattack_images:
        out.update(autoattack_accuracy(model, test, eps=settings.eval_eps, n_images=settings.autoattack_images,
                                       seed=seed, batch_size=batch_size))
    return out
