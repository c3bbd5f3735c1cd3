"""SPECTRE poison filter (Hayase et al., 2021) in pure torch: robust whitening + QUantum Entropy (QUE) scores.

PUD runs SPECTRE on one class's layer representations and drops the top round(1.5·eps) scores. The authors'
code calls a Julia script whose robust-covariance dependency is missing from their repository, so this is a
fresh implementation of SPECTRE's structure (PCA, robust whitening, QUE scores, the dimension chosen by the
separation criterion); the robust covariance step is our own procedure (see `robust_mean_cov`, docs/pud.md).

Everything numerical runs in float64 on the input's device. Scores are float64 and higher means more suspicious.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models import eval_mode

__all__ = [
    "SpectreResult",
    "robust_mean_cov",
    "que_scores",
    "spectre_scores",
    "spectre_filter",
    "layer_representations",
]

_DEGENERATE_TOL = 1e-6  # ‖Σ'‖₂ − 1 below this counts as "no excess variance" (M falls back to I/k)


@dataclass
class SpectreResult:
    """SPECTRE output. `scores`: [N] float64, higher = more suspicious. `k`: chosen PCA dimension.
    `flagged_mask`: [N] bool, True = flagged as poison. `criteria`: k -> selection criterion (larger = better)."""

    scores: Tensor
    k: int
    flagged_mask: Tensor
    criteria: Dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------------------------
def _mean_cov(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased (1/n) covariance of the rows of x."""
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / x.shape[0]


def _inv_sqrt(cov: Tensor) -> Tensor:
    """Symmetric inverse square root, flooring tiny eigenvalues so rank-deficient inputs don't blow up."""
    ev, u = torch.linalg.eigh(cov)
    floor = ev.max().clamp_min(torch.finfo(cov.dtype).tiny) * 1e-12
    return (u * ev.clamp_min(floor).rsqrt()) @ u.T


def _chi2_median(k: int) -> float:
    """Median of χ²_k (bisection on the regularized incomplete gamma), for consistency rescaling."""
    half_k = torch.tensor(k / 2.0, dtype=torch.float64)
    lo, hi = 0.0, float(k) + 10.0 * math.sqrt(2.0 * k) + 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if torch.special.gammainc(half_k, torch.tensor(mid / 2.0, dtype=torch.float64)).item() < 0.5:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _que_weights(eigvals: Tensor, alpha: float) -> Tensor:
    """Eigenvalues of M = exp(α(Σ'−I)/(‖Σ'‖₂−1)) / tr(·), given the eigenvalues of Σ'.

    The common factor exp(α(λ_max−1)/(‖Σ'‖−1)) is divided out before exponentiating (no overflow); it cancels in
    the trace normalization. If ‖Σ'‖₂ − 1 ≤ 1e-6 (whitened data has no direction with excess variance, e.g. a
    non-robust whitening or k = 1 with Σ' = 1) the formula is 0/0; we use M = I/k, i.e. the α → 0 limit.
    """
    lam_max = eigvals.max()
    denom = lam_max.item() - 1.0
    if not math.isfinite(denom) or denom <= _DEGENERATE_TOL:
        return torch.full_like(eigvals, 1.0 / eigvals.numel())
    w = torch.exp(alpha * (eigvals - lam_max) / denom)
    return w / w.sum()


def _stable_top(scores: Tensor, n: int) -> Tensor:
    """Boolean mask of the n highest scores (stable tie-break: lower index wins). Deterministic."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if n > 0:
        mask[torch.argsort(-scores, stable=True)[:n]] = True
    return mask


def _stable_bottom(scores: Tensor, n: int) -> Tensor:
    """Boolean mask of the n lowest scores (stable tie-break)."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if n > 0:
        mask[torch.argsort(scores, stable=True)[:n]] = True
    return mask


# --------------------------------------------------------------------------------------------------------------
# QUE scores
# --------------------------------------------------------------------------------------------------------------
def que_scores(x_whitened: Tensor, alpha: float = 4.0) -> Tensor:
    """QUantum Entropy outlier scores of (robustly) whitened, centred data.

    Σ' = covariance (1/N, centred at the sample mean) of x_whitened,
    M = exp(α(Σ'−I)/(‖Σ'‖₂−1)) / tr(exp(·)), score_i = x_iᵀ M x_i (x_i as given, i.e. relative to the robust centre).
    α interpolates between Mahalanobis-like (α → 0: M = I/k) and the top-eigendirection projection (α → ∞).
    See `_que_weights` for the ‖Σ'‖₂ ≈ 1 case. Returns float64 [N].
    """
    if x_whitened.dim() != 2:
        raise ValueError(f"x_whitened must be [N, k], got shape {tuple(x_whitened.shape)}")
    y = x_whitened.to(torch.float64)
    n, k = y.shape
    if n == 0:
        return y.new_zeros(0)
    _, sigma = _mean_cov(y)
    ev, u = torch.linalg.eigh(sigma)
    w = _que_weights(ev, alpha)
    proj = y @ u  # coordinates in Σ' eigenbasis
    return (proj.square() * w).sum(1)


def _separation_criterion(p: Tensor, kept: Tensor, alpha: float) -> float:
    """tr(Σ'M)/tr(M) where Σ' = covariance of ALL points whitened by the kept set's mean/covariance.

    If the kept set is clean, every direction in which the removed points differ from it carries excess variance
    in Σ', and M (QUE) weights the largest such excess most. Larger = removed set more separated from a
    kept set that is itself whitened to ≈ I (looks Gaussian). Pure tail-trimming of clean data gives ≈ 1.3–1.5 here.
    """
    mu, cov = _mean_cov(p[kept])
    y = (p - mu) @ _inv_sqrt(cov)
    _, sigma = _mean_cov(y)
    ev = torch.linalg.eigvalsh(sigma)
    w = _que_weights(ev, alpha)
    return float((ev * w).sum().item())


# --------------------------------------------------------------------------------------------------------------
# robust covariance
# --------------------------------------------------------------------------------------------------------------
def _whiten_with(x: Tensor, kept: Tensor, chi2_med: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Estimate (mean, cov) from the kept rows, rescale cov so the median Mahalanobis² of ALL rows equals the χ²_k
    median (undoes the shrinkage caused by trimming; MCD-style consistency factor), and whiten all rows."""
    mu, cov = _mean_cov(x[kept])
    y = (x - mu) @ _inv_sqrt(cov)
    med = y.square().sum(1).median().item()
    c = med / chi2_med if med > 0 and math.isfinite(med) else 1.0
    return mu, cov * c, y / math.sqrt(c)


def _kept_looks_gaussian(y: Tensor, kept: Tensor, n_directions: int, kurtosis_z: float) -> bool:
    """Gaussianity test for the kept set: along the top `n_directions` eigenvectors of the covariance of ALL
    whitened points (the directions where the data has more variance than the kept set explains), the kept
    points' excess kurtosis must be ≤ kurtosis_z · sqrt(24/n) (its standard error under a Gaussian). A leftover
    shifted cluster gives large positive excess kurtosis along its direction; trimmed clean tails give ≤ 0."""
    _, sigma = _mean_cov(y)
    _, u = torch.linalg.eigh(sigma)
    dirs = u[:, -min(n_directions, u.shape[1]):]
    z = y[kept] @ dirs
    z = z - z.mean(0)
    var = z.square().mean(0).clamp_min(torch.finfo(z.dtype).tiny)
    excess = z.pow(4).mean(0) / var.square() - 3.0
    se = math.sqrt(24.0 / max(int(kept.sum().item()), 1))
    return bool((excess <= kurtosis_z * se).all().item())


def _skew_pursuit(y: Tensor, iters: int) -> Tuple[float, Tensor]:
    """Direction of maximal |skewness| of whitened data: third-order tensor power iteration u ← E[(uᵀy)² y]
    from the k coordinate axes in parallel (batched, deterministic). Returns (|skew|, unit direction oriented
    so the skew is positive, i.e. the small/far mode lies on the + side)."""
    n, k = y.shape
    u = torch.eye(k, dtype=y.dtype, device=y.device)
    for _ in range(iters):
        u = y.T @ (y @ u).square() / n
        u = u / u.norm(dim=0, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    z = y @ u
    z = z - z.mean(0)
    skew = z.pow(3).mean(0) / z.square().mean(0).clamp_min(torch.finfo(y.dtype).tiny).pow(1.5)
    i = int(skew.abs().argmax().item())
    sk = float(skew[i].item())
    return abs(sk), u[:, i] * (1.0 if sk >= 0 else -1.0)


_NULL_SKEW_CACHE: Dict[Tuple[int, int, int], float] = {}


def _null_skew(n: int, k: int, iters: int) -> float:
    """Max |skew| `_skew_pursuit` finds on one Gaussian sample of the same shape (fixed seed, cached). The
    maximum over directions of k-dim data is far above the fixed-direction value (≈0.9 for n=1060, k=49), so
    this parametric null is needed to calibrate the test."""
    key = (n, k, iters)
    if key not in _NULL_SKEW_CACHE:
        g = torch.Generator().manual_seed(12345)
        z = torch.randn(n, k, generator=g, dtype=torch.float64)
        mu, cov = _mean_cov(z)
        _NULL_SKEW_CACHE[key] = _skew_pursuit((z - mu) @ _inv_sqrt(cov), iters)[0]
    return _NULL_SKEW_CACHE[key]


def _minor_side(z: Tensor, iters: int = 100) -> float:
    """+1/−1: the side (relative to the larger component) on which the smaller component of a two-Gaussian 1-D
    mixture fitted to z lies. EM is run from five splits (quantiles 0.1…0.9) in parallel and the fit with the
    highest likelihood is kept. For a poisoned cluster that is nearly half of the set, the skew sign can point at
    the broad clean mode; the mixture weights give the minority side (the poison, if it is the minority)."""
    n = z.shape[0]
    qs = torch.quantile(z, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=z.dtype, device=z.device))
    hi = (z[None, :] > qs[:, None]).to(z.dtype)  # [5, n] initial responsibilities of component "hi"
    resp = torch.stack([1.0 - hi, hi], 1)  # [5, 2, n]
    tiny = torch.finfo(z.dtype).tiny
    ll = torch.full((qs.numel(),), -math.inf, dtype=z.dtype, device=z.device)
    w = mu = var = None
    for _ in range(iters):
        nk = resp.sum(2).clamp_min(1e-9)  # M-step
        w = nk / n
        mu = (resp * z).sum(2) / nk
        var = ((resp * (z - mu[..., None]).square()).sum(2) / nk).clamp_min(1e-6 * z.var().item() + tiny)
        logp = (w.log() - 0.5 * (2 * math.pi * var).log())[..., None] - 0.5 * (z - mu[..., None]).square() / var[..., None]
        ll = torch.logsumexp(logp, 1).sum(1)  # E-step
        resp = (logp - torch.logsumexp(logp, 1, keepdim=True)).exp()
    b = int(ll.argmax().item())
    minor = int(w[b].argmin().item())
    return 1.0 if (mu[b, minor] - mu[b, 1 - minor]).item() >= 0 else -1.0


def _robust_mean_cov_impl(x: Tensor, eps: float, budget: float, alpha: float, max_iter: int,
                          kurtosis_z: float, n_directions: int, skew_z: float = 4.0,
                          pursuit_iters: int = 30) -> Tuple[Tensor, Tensor, Tensor, str]:
    n, k = x.shape
    m = int(math.floor(budget * eps * n))
    m = max(0, min(m, n // 2, n - k - 2))  # keep enough rows for a non-singular covariance
    kept = torch.ones(n, dtype=torch.bool, device=x.device)
    if m == 0:
        mu, cov = _mean_cov(x)
        return mu, cov, kept, "no-budget"
    chi2_med = _chi2_median(k)

    # Step 1: skewness pursuit on the full-sample-whitened data (finds a shifted cluster even when it is compact
    # and therefore central in Mahalanobis distance).
    mu0, cov0 = _mean_cov(x)
    y0 = (x - mu0) @ _inv_sqrt(cov0)
    skew, u = _skew_pursuit(y0, pursuit_iters)
    z = y0 @ u
    zc = z - z.mean()
    excess_kurt = (zc.pow(4).mean() / zc.square().mean().square()).item() - 3.0
    skewed = skew > _null_skew(n, k, pursuit_iters) + skew_z * math.sqrt(6.0 / n)
    bimodal = excess_kurt < -skew_z * math.sqrt(24.0 / n)  # two comparable modes: light tails, little skew
    if skewed or bimodal:
        # drop the m rows farthest out on the minority mode's side
        kept = _stable_bottom(z * _minor_side(z), n - m)
        status = "pursuit"
    else:
        # Step 2: isotropic concentration (MCD-style C-steps on Mahalanobis distance).
        status = "isotropic"
        for _ in range(max_iter):
            _, _, y = _whiten_with(x, kept, chi2_med)
            new = _stable_bottom(y.square().sum(1), n - m)
            if torch.equal(new, kept):
                break
            kept = new
        mu, cov, y = _whiten_with(x, kept, chi2_med)
        # Stop if the kept set already looks Gaussian along the suspicious directions.
        if _kept_looks_gaussian(y, kept, n_directions, kurtosis_z):
            return mu, cov, kept, status
        status = "isotropic+directional"

    # Step 3: directional concentration (C-steps on QUE scores of all rows, whitened by the kept set).
    mu, cov, y = _whiten_with(x, kept, chi2_med)
    for _ in range(max_iter):
        new = _stable_bottom(que_scores(y, alpha), n - m)
        if torch.equal(new, kept):
            break
        kept = new
        mu, cov, y = _whiten_with(x, kept, chi2_med)
    return mu, cov, kept, status


def robust_mean_cov(x: Tensor, eps: float, *, budget: float = 1.5, alpha: float = 4.0, max_iter: int = 20,
                    skew_z: float = 4.0, kurtosis_z: float = 4.0, n_directions: int = 3,
                    pursuit_iters: int = 30) -> Tuple[Tensor, Tensor]:
    """Robust mean/covariance (float64) by iterative filtering. At most m = min(floor(budget·eps·N), N/2, N−k−2)
    rows are removed. budget 1.5 matches SPECTRE's flagging slack (the official filter allowed 2·eps).

    Why: whitening with the plain covariance hides a poisoned cluster, because its direction is absorbed into the
    covariance. The estimate must come from a set without the cluster. Procedure (ours; the reference's
    `dkk17.jl` is missing from the repo):
      1. Pursuit: whiten with the plain estimate and find the direction of maximal |skewness| (tensor power
         iteration). Test it against the same search on a seeded Gaussian sample of equal shape, +skew_z SEs;
         strongly negative excess kurtosis along it (two similar modes) also counts. If the test fires, start
         from the set without the m rows farthest toward the minority mode (a 2-Gaussian 1-D fit picks the side).
         This catches compact clusters, which sit central in Mahalanobis distance.
      2. Otherwise, isotropic concentration: keep the N−m rows with the smallest Mahalanobis distance and
         re-estimate, until stable (MCD-style C-steps). Stop here if the kept rows look Gaussian: along the top
         `n_directions` eigenvectors of cov(all rows whitened by the kept estimate), their excess kurtosis must be
         ≤ kurtosis_z SEs. A leftover shifted cluster gives large positive kurtosis there.
      3. Directional concentration: keep the N−m rows with the lowest QUE scores (all rows whitened by the kept
         estimate, so the top-eigen direction of excess variance dominates) and re-estimate, until stable.
    Each covariance is rescaled so that the median Mahalanobis² of all rows equals the χ²_k median (consistency
    after trimming). The termination tests use 3rd/4th moments, not "top eigenvalue ≈ Gaussian", because
    trimming itself creates a spectral spike. The procedure assumes the clean rows are the majority. At eps ≈ 0.5
    (PUD's target-class run) it is at breakdown: a poison mode more compact than the clean one can be
    taken for the clean mode.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, k], got shape {tuple(x.shape)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if x.shape[0] < 2:
        raise ValueError("robust_mean_cov needs at least 2 rows")
    mu, cov, _, _ = _robust_mean_cov_impl(x.to(torch.float64), eps, budget, alpha, max_iter, kurtosis_z,
                                          n_directions, skew_z, pursuit_iters)
    return mu, cov


# --------------------------------------------------------------------------------------------------------------
# SPECTRE
# --------------------------------------------------------------------------------------------------------------
def _pca_scores(xc: Tensor, max_dim: int) -> Tensor:
    """Top principal-component coordinates [N, d'] of centred data (eigh of the smaller Gram matrix, float64;
    deterministic). Components below 1e-10 × the top eigenvalue (numerical rank) are dropped."""
    n, d = xc.shape
    if d <= n:
        ev, u = torch.linalg.eigh(xc.T @ xc)
        ev, u = ev.flip(0), u.flip(1)
        keep = int((ev > ev[0].clamp_min(0) * 1e-10).sum().item()) if ev[0] > 0 else 0
        keep = min(keep, max_dim)
        return xc @ u[:, :keep]
    ev, u = torch.linalg.eigh(xc @ xc.T)
    ev, u = ev.flip(0), u.flip(1)
    keep = int((ev > ev[0].clamp_min(0) * 1e-10).sum().item()) if ev[0] > 0 else 0
    keep = min(keep, max_dim)
    return u[:, :keep] * ev[:keep].clamp_min(0).sqrt()


def spectre_scores(reps: Tensor, poison_fraction: float, alpha: float = 4.0, max_dim: int = 64,
                   ks: Optional[Sequence[int]] = None, **robust_kwargs) -> SpectreResult:
    """SPECTRE: for each candidate PCA dimension k, robust-whiten the top-k PCA coordinates and compute QUE scores,
    then keep the k whose kept set (all but the round(1.5·poison_fraction·N) top scores) gives the LARGEST
    separation criterion tr(Σ'M)/tr(M) (as SPECTRE's own code chooses k).

    The criterion is evaluated in one common space (the top-d' PCA coordinates, d' = min(max_dim, rank, ...)), so
    values are comparable across k: Σ' = covariance of all points whitened by the kept set's mean/covariance, M its
    QUE matrix. A kept set that is clean (looks Gaussian, whitened to ≈ I) leaves the removed poison as a strong
    excess-variance direction → large value. A kept set that still holds the poison absorbs that direction
    into its covariance → Σ' ≈ I → value near 1. So best = max; ties go to the smaller k. Caveat: a very compact
    kept set also scores high, so at poison_fraction ≈ 0.5 a compact poison mode can win (see robust_mean_cov).

    ks: candidate dims (default squares 1, 4, 9, … ≤ d'); invalid ones are dropped. `robust_kwargs` go to
    `robust_mean_cov`. Returns SpectreResult(scores of the chosen k, k, mask of the round(1.5·pf·N) top, criteria).
    """
    if reps.dim() != 2:
        raise ValueError(f"reps must be [N, D], got shape {tuple(reps.shape)}")
    if not 0.0 <= poison_fraction < 1.0 / 1.5:
        raise ValueError(f"poison_fraction must be in [0, 2/3), got {poison_fraction}")
    x = reps.detach().to(torch.float64)
    n = x.shape[0]
    n_rm = min(int(round(1.5 * poison_fraction * n)), n)
    empty = SpectreResult(scores=x.new_zeros(n), k=0, flagged_mask=_stable_top(x.new_zeros(n), n_rm))
    if n < 4:
        return empty
    p = _pca_scores(x - x.mean(0), max(1, int(max_dim)))
    d_prime = min(p.shape[1], n - n_rm - 2)  # kept set must give a non-singular d'-dim covariance
    if d_prime < 1:
        return empty
    p = p[:, :d_prime]

    if ks is None:
        cand = [r * r for r in range(1, math.isqrt(d_prime) + 1)]
    else:
        cand = sorted({int(k) for k in ks if 1 <= int(k) <= d_prime})
        if not cand:
            raise ValueError(f"no valid k in {list(ks)} (need 1 <= k <= {d_prime})")

    best: Optional[Tuple[float, int, Tensor]] = None
    criteria: Dict[int, float] = {}
    for k in cand:
        z = p[:, :k]
        mu, cov = robust_mean_cov(z, poison_fraction, alpha=alpha, **robust_kwargs)
        s = que_scores((z - mu) @ _inv_sqrt(cov), alpha)
        crit = _separation_criterion(p, ~_stable_top(s, n_rm), alpha)
        criteria[k] = crit
        if best is None or crit > best[0]:
            best = (crit, k, s)
    assert best is not None
    _, k_best, s_best = best
    return SpectreResult(scores=s_best, k=k_best, flagged_mask=_stable_top(s_best, n_rm), criteria=criteria)


def spectre_filter(reps: Tensor, remove_fraction: float, poison_fraction: Optional[float] = None,
                   alpha: float = 4.0, max_dim: int = 64, ks: Optional[Sequence[int]] = None,
                   **robust_kwargs) -> SpectreResult:
    """Flag the round(remove_fraction·N) highest SPECTRE scores (True = poison). remove_fraction is the removal
    budget for this set. The assumed poison fraction defaults to remove_fraction/1.5 (SPECTRE removes 1.5·ε)."""
    if not 0.0 <= remove_fraction < 1.0:
        raise ValueError(f"remove_fraction must be in [0, 1), got {remove_fraction}")
    pf = remove_fraction / 1.5 if poison_fraction is None else poison_fraction
    res = spectre_scores(reps, pf, alpha=alpha, max_dim=max_dim, ks=ks, **robust_kwargs)
    n_flag = min(int(round(remove_fraction * reps.shape[0])), reps.shape[0])
    res.flagged_mask = _stable_top(res.scores, n_flag)
    return res


# --------------------------------------------------------------------------------------------------------------
# representations
# --------------------------------------------------------------------------------------------------------------
def layer_representations(model: nn.Module, layer_name: str, x_batches: Iterable) -> Tensor:
    """Flattened outputs [N, D] (CPU float32) of `model.<layer_name>` over input batches. Works on any module
    (the reference required an nn.Sequential).

    Runs in eval mode under no_grad. The hook is always removed and every submodule's train/eval flag is
    restored, even if an exception occurs. A batch may be a tensor or a (x, y, ...) tuple/list (first item is
    used), moved to the model's device. Raises ValueError for an unknown layer or when no batch was given.
    """
    modules = dict(model.named_modules())
    if layer_name not in modules:
        names = [name for name in modules if name]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"unknown layer {layer_name!r}; available modules: {shown}")
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    device = first.device if first is not None else None

    outs = []

    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        outs.append(output.detach().reshape(output.shape[0], -1).to("cpu", torch.float32))

    handle = modules[layer_name].register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in x_batches:
                xb = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    xb = xb.to(device)
                model(xb)
    finally:
        handle.remove()
    if not outs:
        raise ValueError("x_batches yielded no batches")
    return torch.cat(outs, 0)
