"""The project's one adversarial-example generator: batched PGD (L∞ / L2) and robust accuracy.

Everything lives in pixel space: inputs are float images in [0,1] (NCHW) and ε, α are measured in
those units (8/255 is the usual L∞ budget); models normalise internally. ``pgd`` is the function,
``PGD`` a small torchattacks-style object holding the settings (the defenses' adversarial training
and the evaluation both take one), and ``robust_accuracy`` the accuracy on PGD examples of a split.

The attack runs the model in eval mode and restores every submodule's previous train/eval flag
afterwards, also when the model raises. Gradients are taken with ``torch.autograd.grad`` with
respect to the input only, so parameter ``.grad`` fields are never touched (and no weight gradient
is computed), and the result is detached. ``clamp=False`` skips the [0,1] clamp, reproducing the
paper code's unclamped PGD. For the toolkit's own models the attack differentiates their folded
*attack view* (``models.folding``: conv->BN pairs as single convolutions), which is faster.

``RobustEvalSettings`` is the robust-accuracy evaluation every script reports (L∞ PGD, ε 8/255,
α 2/255, 20 steps, random start), and ``robust_eval`` runs it with a seeded random start.

``window=k`` (an option of this toolkit, not of the papers) restricts the perturbation of each image
to one k x k window of pixels (all channels), drawn uniformly at random per image and per run. With
L∞ ε = 1 this is a *patch-shaped* adversarial example: the attack may paint any pixel values into a
small square, which is what a BadNets patch trigger is and what an ε = 6/255 perturbation of the
whole image cannot imitate. ``window=0`` (default) perturbs the whole image.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models import eval_mode
from models.folding import attack_view
from utils.run import distributed as dist, interrupt
from utils.run.progress import n_batches, progress
from utils.settings import Settings, checked_int, fraction, opt, require

__all__ = ["NORMS", "PGD", "RobustEvalSettings", "pgd", "robust_accuracy", "robust_eval", "window_masks"]

NORMS = ("linf", "l2")
_TINY = 1e-12  # guards the L2 normalisations against zero gradients / zero perturbations
WINDOW_AT_SHARE = 0.5  # with ``window_at``: the share of windows placed at one of the given positions


def _check(eps, alpha, steps, norm, restarts, window=0, eps_outside=0.0) -> tuple[float, float, int, int, int, float]:
    """Validate the settings; returns (eps, alpha, steps, restarts, window, eps_outside) as plain float/int."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    out = []
    for name, v in (("eps", eps), ("alpha", alpha), ("eps_outside", eps_outside)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f) or f < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        out.append(f)
    for name, v, lo in (("steps", steps, 0), ("restarts", restarts, 1), ("window", window, 0)):
        out.append(checked_int(name, v, lo))
    eps, alpha, eps_outside, steps, restarts, window = out
    if eps_outside > 0 and (window == 0 or norm != "linf"):
        raise ValueError("eps_outside (the budget outside the window) needs window > 0 and the linf norm")
    if eps_outside > eps:
        raise ValueError(f"eps_outside {eps_outside} must not exceed eps {eps} (the budget inside the window)")
    return eps, alpha, steps, restarts, window, eps_outside


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped (N, 1, 1, ...) to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def window_masks(top: Tensor, left: Tensor, k: int, like: Tensor) -> Tensor:
    """(N, 1, H, W) 0/1 masks, mask i one k x k window at (``top[i]``, ``left[i]``), with ``like``'s H, W, device
    and dtype (the PGD's windows and ``window_search``'s positions)."""
    h, w = like.shape[-2], like.shape[-1]
    top = top.to(like.device).view(-1, 1, 1)
    left = left.to(like.device).view(-1, 1, 1)
    rows = torch.arange(h, device=like.device).view(1, h, 1)
    cols = torch.arange(w, device=like.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + k) & (cols >= left) & (cols < left + k)
    return inside.unsqueeze(1).to(like.dtype)


def _window_mask(x: Tensor, k: int, generator: torch.Generator | None, at: Tensor | None = None) -> Tensor | None:
    """A (N, 1, H, W) 0/1 mask holding one k x k window per image at a uniform random position (None: k == 0).

    ``at`` (M, 2): candidate (top, left) positions; each image's window is then at one of them (drawn
    uniformly) with probability ``WINDOW_AT_SHARE``, else uniform as without it.
    """
    if k == 0:
        return None
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    dev = generator.device if generator is not None else x.device
    top = torch.randint(0, h - k + 1, (n,), generator=generator, device=dev)
    left = torch.randint(0, w - k + 1, (n,), generator=generator, device=dev)
    if at is not None:
        if int(at.min()) < 0 or int(at[:, 0].max()) > h - k or int(at[:, 1].max()) > w - k:
            raise ValueError(f"window positions must lie in [0, {h - k}] x [0, {w - k}] for {k}x{k} windows")
        at = at.to(dev)
        placed = torch.rand(n, generator=generator, device=dev) < WINDOW_AT_SHARE
        which = torch.randint(0, at.shape[0], (n,), generator=generator, device=dev)
        top = torch.where(placed, at[which, 0], top)
        left = torch.where(placed, at[which, 1], left)
    return window_masks(top, left, k, x)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random perturbation: uniform in the ε-box (L∞) or uniform in the ε-ball (L2)."""
    dev = generator.device if generator is not None else x.device
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype)
        delta = (2 * u - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
        d = d / _per_sample_norm(d).clamp_min(_TINY)
        r = torch.rand((x.shape[0],), generator=generator, device=dev, dtype=x.dtype)
        r = r.pow(1.0 / max(x[0].numel(), 1)) * eps  # radius of a uniform draw from the ball, always <= ε
        delta = d * r.view(-1, *([1] * (x.dim() - 1)))
    return delta.to(x.device)


def _project(x_adv: Tensor, x: Tensor, eps, norm: str, clamp: bool, mask: Tensor | None = None) -> Tensor:
    """Project onto the ε-neighbourhood of ``x`` (then [0,1]; clamping only shrinks the perturbation).

    L∞: ``eps`` is a number or a per-pixel bound (a window's budget map). L2: with ``mask`` the
    perturbation is first zeroed outside the window, then scaled into the ε-ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = torch.minimum(torch.maximum(delta, -eps), eps) if torch.is_tensor(eps) else delta.clamp(-eps, eps)
    else:
        if mask is not None:
            delta = delta * mask
        n = _per_sample_norm(delta)
        delta = delta * (eps / n.clamp_min(_TINY)).clamp(max=1.0)
    out = x + delta
    return out.clamp(0.0, 1.0) if clamp else out


def _run_draws(x: Tensor, eps: float, norm: str, random_start: bool, generator: torch.Generator | None,
               window: int, eps_outside: float, window_at: Tensor | None = None
               ) -> tuple[Tensor | None, float | Tensor, Tensor | None]:
    """One run's random draws, in the order every run makes them: the windows, then the start.

    Returns (window mask or None, per-pixel or scalar bound, random start or None). ``PGD.skip`` makes the
    same draws without attacking, so the generator ends where attacking the batch would leave it.
    """
    mask = _window_mask(x, window, generator, window_at)
    bound = eps
    if mask is not None and norm == "linf":
        bound = eps * mask + eps_outside * (1 - mask)
    delta = _random_start(x, bound, norm, generator) if random_start else None
    return mask, bound, delta


def _run_count(x: Tensor, eps: float, steps: int, random_start: bool, restarts: int, window: int) -> int:
    """How many PGD runs attacking ``x`` makes (0: it returns ``x`` unchanged and draws nothing)."""
    if eps == 0 or steps == 0 or x.shape[0] == 0:
        return 0
    if window > min(x.shape[-2:]):
        raise ValueError(f"window {window} is larger than the {x.shape[-2]}x{x.shape[-1]} images")
    return restarts if (random_start or window) else 1  # without random starts or windows every restart is the same


def _run(model, x, y, eps, alpha, steps, norm, random_start, targeted, clamp, generator, window=0,
         eps_outside=0.0, window_at=None) -> Tensor:
    """One PGD run from one (random or zero) start; returns the detached final iterate.

    With ``window`` > 0 the run draws its windows first, then (if ``random_start``) the start. L∞
    then works with a per-pixel budget (``eps`` inside the window, ``eps_outside`` elsewhere) and
    steps of ``alpha`` scaled by the same ratio, so both parts take their budget in the same steps.
    """
    mask, bound, delta = _run_draws(x, eps, norm, random_start, generator, window, eps_outside, window_at)
    step_size = alpha * (bound / eps) if torch.is_tensor(bound) else alpha
    x_adv = x.clone()
    if delta is not None:
        x_adv = _project(x_adv + delta, x, bound, norm, clamp, mask)
    sign = -1.0 if targeted else 1.0  # targeted: descend CE toward the target labels
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")  # sum: per-sample gradients independent of N
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach()
        if norm == "linf":
            step = g.sign()
        else:
            if mask is not None:
                g = g * mask  # the whole step length goes into the window
            step = g / _per_sample_norm(g).clamp_min(_TINY)  # zero gradient -> zero step
        x_adv = _project(x_adv + (sign * step_size) * step, x, bound, norm, clamp, mask)
    return x_adv.detach()


@torch.no_grad()
def _score(model, x_adv, y, targeted) -> tuple[Tensor, Tensor]:
    """Per-sample (success, objective): objective is CE (untargeted) or -CE to the target (targeted)."""
    logits = model(x_adv)
    ce = F.cross_entropy(logits, y, reduction="none")
    pred = logits.argmax(1)
    if targeted:
        return pred == y, -ce
    return pred != y, ce


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, targeted: bool = False, clamp: bool = True,
        generator: torch.Generator | None = None, window: int = 0, eps_outside: float = 0.0,
        window_at: Tensor | None = None) -> Tensor:
    """Projected gradient descent on the cross-entropy, batched; returns detached adversarial images.

    Untargeted (default) ascends CE(model(x_adv), y); ``targeted=True`` treats ``y`` as target labels
    and descends CE toward them. L∞ takes sign steps of size ``alpha`` and projects onto the ε-box;
    L2 takes steps of length ``alpha`` along the per-sample normalised gradient and projects onto the
    ε-ball. With ``random_start`` each run starts from a random point (uniform in the box / ball,
    drawn from ``generator`` if given). With ``restarts > 1`` each sample keeps the run that
    succeeded (untargeted: misclassified; targeted: predicted as the target), else the one with the
    best objective (highest CE; targeted: lowest CE to the target); the first run is the one a
    single-restart call with the same generator state would make, so restarts never do worse.
    ``clamp`` keeps images in [0,1] (the centre ``x`` is clamped too). ``eps == 0`` or
    ``steps == 0`` returns ``x`` (clamped) unchanged. ``window=k > 0`` confines each image's
    perturbation to one random k x k window (all channels; drawn from ``generator`` at the start of
    every run, so restarts also try other windows); use it with L∞ ε = 1 for patch-shaped examples.
    ``eps_outside`` (L∞ only, <= ε) lets the rest of the image move by that much at the same time
    (e.g. ε = 1 in the window plus 6/255 everywhere else: a patch and an ordinary example in one);
    its step is ``alpha * eps_outside / eps``. ``window_at`` (M, 2) holds (top, left) window positions:
    half the windows (``WINDOW_AT_SHARE``) go to one of them, the rest stay uniform.
    """
    eps, alpha, steps, restarts, window, eps_outside = _check(eps, alpha, steps, norm, restarts, window, eps_outside)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
    # inference_mode(False)/clone: usable from inside inference or no-grad blocks of the caller
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        y = y.detach().clone()
        if clamp:
            x = x.clamp(0.0, 1.0)
        runs = _run_count(x, eps, steps, random_start, restarts, window)
        if runs == 0:
            return x
        with eval_mode(model):
            net = attack_view(model)
            best = _run(net, x, y, eps, alpha, steps, norm, random_start, targeted, clamp, generator, window, eps_outside,
                        window_at)
            if runs == 1:
                return best
            best_ok, best_obj = _score(net, best, y, targeted)
            for _ in range(runs - 1):
                cand = _run(net, x, y, eps, alpha, steps, norm, random_start, targeted, clamp, generator, window,
                            eps_outside, window_at)
                ok, obj = _score(net, cand, y, targeted)
                take = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
                best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, best)
                best_ok = best_ok | ok
                best_obj = torch.where(take, obj, best_obj)
            return best


class PGD:
    """PGD settings as an object (torchattacks style): ``PGD(eps=8/255)(model, x, y) -> x_adv``."""

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, targeted: bool = False, clamp: bool = True,
                 generator: torch.Generator | None = None, window: int = 0, eps_outside: float = 0.0,
                 window_at: Tensor | None = None):
        self.eps, self.alpha, self.steps, self.restarts, self.window, self.eps_outside = _check(
            eps, alpha, steps, norm, restarts, window, eps_outside)
        if window_at is not None:
            window_at = torch.as_tensor(window_at, dtype=torch.long).reshape(-1, 2)
            if self.window == 0 or window_at.shape[0] == 0:
                raise ValueError("window_at needs window > 0 and at least one (top, left) position")
        self.window_at = window_at
        self.norm, self.random_start = norm, bool(random_start)
        self.targeted, self.clamp = bool(targeted), bool(clamp)
        self.generator = generator

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Attack a batch; ``generator`` overrides the one given at construction for this call."""
        return pgd(model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, random_start=self.random_start,
                   restarts=self.restarts, targeted=self.targeted, clamp=self.clamp,
                   generator=generator if generator is not None else self.generator, window=self.window,
                   eps_outside=self.eps_outside, window_at=self.window_at)

    def skip(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Advance the generator exactly as attacking the batch ``x`` would, without attacking it.

        Under torchrun each rank attacks every world-th test batch and skips the others, so every batch gets
        the random start one process would draw and the summed robust accuracy equals the one-process number.
        """
        gen = generator if generator is not None else self.generator
        for _ in range(_run_count(x, self.eps, self.steps, self.random_start, self.restarts, self.window)):
            _run_draws(x, self.eps, self.norm, self.random_start, gen, self.window, self.eps_outside, self.window_at)

    def settings(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "steps": self.steps, "norm": self.norm,
                "random_start": self.random_start, "restarts": self.restarts, "targeted": self.targeted,
                "clamp": self.clamp, "window": self.window, "eps_outside": self.eps_outside,
                **({"window_at": self.window_at.tolist(), "window_at_share": WINDOW_AT_SHARE}
                   if self.window_at is not None else {})}

    def __repr__(self) -> str:
        return "PGD(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"


def robust_accuracy(model: nn.Module, test, attack: PGD, batch_size: int = 256, max_images: int | None = None,
                    generator: torch.Generator | None = None, channels_last: bool = False) -> dict:
    """Accuracy on ``attack``'s examples of a test split (anything with ``batches`` yielding (idx, x, y)).

    Uses the first ``max_images`` images (all if None). Returns ``{"robust_acc": fraction,
    "robust_eval": attack.settings() + {"images": n}}``; the model's train/eval flags are restored.
    Under torchrun each rank attacks every world-th batch and skips the others (``PGD.skip``: same
    random starts as one process) and the counts are summed, so the result equals one process's.
    """
    if attack.targeted:
        raise ValueError("robust_accuracy needs an untargeted attack (y are the true labels)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
    dist.sync_buffers(model)  # torchrun: every rank attacks the same model
    seen = n = correct = 0
    with eval_mode(model):
        total = n_batches(len(test) if max_images is None else min(len(test), max_images), batch_size)
        batches = progress(test.batches(batch_size), f"robust accuracy (PGD-{attack.steps})", total)
        for b, (_, x, y) in enumerate(batches):
            if max_images is not None:
                if seen >= max_images:
                    break
                x, y = x[:max_images - seen], y[:max_images - seen]
            seen += y.numel()
            interrupt.check(f"the robust evaluation, batch {b}")  # a long pass: a signal stops it here
            if not dist.owns_batch(b):  # torchrun: another rank attacks this batch
                attack.skip(x, generator)
                continue
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x_adv = attack(model, x, y, generator=generator)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum().item()
            n += y.numel()
    correct, n = dist.all_reduce_sum(torch.tensor([correct, n])).tolist()
    return {"robust_acc": correct / max(n, 1), "robust_eval": {**attack.settings(), "images": n}}


@dataclass(frozen=True)
class RobustEvalSettings(Settings):
    GROUP = "robust-accuracy evaluation (L-inf PGD with a random start, pixel units)"
    eval_eps: float = opt(8 / 255, "PGD radius", type=fraction)
    eval_alpha: float = opt(2 / 255, "PGD step", type=fraction)
    eval_steps: int = opt(20, "PGD iterations", type=int)
    autoattack_images: int = opt(0, "also AutoAttack (APGD-CE, APGD-T, FAB-T, Square at the reference strength, "
                                    "radius --eval_eps) on N seeded test images of the final model; 0: off", type=int)

    def check(self) -> None:
        require(0 <= self.eval_eps <= 1, f"--eval_eps must be in [0, 1], got {self.eval_eps}")
        require(self.autoattack_images >= 0, f"--autoattack_images must be >= 0, got {self.autoattack_images}")
        require(self.eval_alpha >= 0, f"--eval_alpha must be >= 0, got {self.eval_alpha}")
        require(self.eval_steps >= 0, f"--eval_steps must be >= 0, got {self.eval_steps}")

    def pgd(self) -> PGD:
        return PGD(eps=self.eval_eps, alpha=self.eval_alpha, steps=self.eval_steps, random_start=True)


def robust_eval(model: nn.Module, test, settings: RobustEvalSettings, seed: int, batch_size: int,
                channels_last: bool = False, amp: str | None = None, earlier: dict | None = None) -> dict:
    """``robust_accuracy`` under ``settings``; the random start is drawn from a CPU generator seeded from
    ``seed``, so the figure is reproducible run to run. The record carries ``robust_eval_key`` of the
    evaluation (``amp``: the model's autocast dtype); an ``earlier`` record with the same key (e.g. the attack
    run's final metrics) is returned instead of attacking the model again (``reusable_robust``)."""
    key = robust_eval_key(model, test, settings, seed, batch_size, channels_last, amp)
    reused = reusable_robust(earlier, key)
    if reused is not None:
        return reused
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    out = robust_accuracy(model, test, settings.pgd(), batch_size=batch_size, generator=gen,
                          channels_last=channels_last)
    if key is not None:
        out["robust_eval"] = {**out["robust_eval"], "key": key}
    return out


def _tensor_bytes(t: Tensor):
    """A tensor's values as bytes in the standard layout (channels_last and devices give the same bytes)."""
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()


def robust_eval_key(model: nn.Module, test, settings: RobustEvalSettings, seed: int, batch_size: int,
                    channels_last: bool, amp: str | None) -> str | None:
    """A fingerprint of everything ``robust_eval``'s figure depends on: the weights, the test images and labels, the
    PGD settings, the seed, the batch size, the memory format and the autocast dtype. Equal keys give the same
    figure, so a defense takes the infected model's robust accuracy from its attack run instead of attacking the
    model again. None for a test split not held in memory as tensors (no reuse)."""
    x, y = getattr(test, "x", None), getattr(test, "y", None)
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        return None
    h = hashlib.sha256()
    for name, t in dist.unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(_tensor_bytes(t))
    h.update(_tensor_bytes(x))
    h.update(_tensor_bytes(y))
    h.update(json.dumps([settings.eval_eps, settings.eval_alpha, settings.eval_steps, int(seed), int(batch_size),
                         bool(channels_last), amp]).encode())
    return h.hexdigest()


def reusable_robust(record: dict | None, key: str | None) -> dict | None:
    """``robust_acc`` and ``robust_eval`` of an earlier evaluation ``record`` (e.g. the attack run's final metrics)
    whose key equals ``key``; None if there is none or it was made on anything else."""
    if not record or key is None or "robust_acc" not in record:
        return None
    if (record.get("robust_eval") or {}).get("key") != key:
        return None
    return {"robust_acc": record["robust_acc"], "robust_eval": {**record["robust_eval"], "reused": True}}
