"""Tests for utils/spectre.py: SPECTRE flags a planted cluster, is deterministic, handles clean data; hook helper."""
import pytest
import torch
from torch import nn

from utils.defenses.spectre import (
    SpectreResult,
    layer_representations,
    que_scores,
    robust_mean_cov,
    spectre_filter,
    spectre_scores,
)

N_CLEAN, N_POISON, DIM, SHIFT = 1000, 60, 50, 6.0


def _planted(seed=0, poison_scale=1.0):
    """1000 clean N(0, Σ) points in 50-D (eigenvalues 10 … 0.1) + 60 poison shifted by 6σ along Σ's
    smallest-variance direction (a modest shift in absolute terms: 1.9 vs a typical clean norm of ~9)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    ev = torch.logspace(1, -1, DIM, dtype=torch.float64)
    a = q * ev.sqrt()
    v = q[:, -1]
    clean = torch.randn(N_CLEAN, DIM, generator=g, dtype=torch.float64) @ a.T
    poison = torch.randn(N_POISON, DIM, generator=g, dtype=torch.float64) @ a.T * poison_scale
    poison = poison + SHIFT * ev[-1].sqrt() * v
    x = torch.cat([clean, poison])
    is_poison = torch.arange(N_CLEAN + N_POISON) >= N_CLEAN
    return x, is_poison, v, ev[-1].item()


def _top_mask(scores, n):
    m = torch.zeros(scores.shape[0], dtype=torch.bool)
    m[scores.topk(n).indices] = True
    return m


def test_planted_cluster_is_not_trivial_for_plain_distances():
    x, is_poison, _, _ = _planted()
    n_flag = round(1.5 * N_POISON)
    xc = x - x.mean(0)
    dist = xc.norm(dim=1)
    maha = (xc @ torch.linalg.inv(xc.T @ xc / len(x)) * xc).sum(1)
    assert is_poison[_top_mask(dist, n_flag)].float().mean() < 0.3
    assert is_poison[_top_mask(maha, n_flag)].float().mean() < 0.5


@pytest.mark.parametrize("poison_scale", [1.0, 0.5])  # 0.5: compact cluster, central in Mahalanobis distance
def test_spectre_flags_planted_cluster(poison_scale):
    x, is_poison, _, _ = _planted(poison_scale=poison_scale)
    n = x.shape[0]
    remove_fraction = 1.5 * N_POISON / n
    res = spectre_filter(x, remove_fraction)
    assert isinstance(res, SpectreResult)
    flagged = res.flagged_mask
    assert flagged.dtype == torch.bool and flagged.shape == (n,)
    assert int(flagged.sum()) == round(remove_fraction * n) == 90
    recall = (flagged & is_poison).sum().item() / N_POISON
    precision = is_poison[flagged].float().mean().item()
    # 90 flagged, 60 poison: precision can be at most 2/3, so check recall ≥ 0.9 and precision ≥ 0.9·(2/3).
    assert recall >= 0.9
    assert precision >= 0.6
    assert res.k in res.criteria and res.criteria[res.k] == max(res.criteria.values())


def test_spectre_precision_with_exact_budget():
    x, is_poison, _, _ = _planted(seed=1)
    n = x.shape[0]
    res = spectre_filter(x, N_POISON / n, poison_fraction=N_POISON / n)
    assert int(res.flagged_mask.sum()) == N_POISON
    assert is_poison[res.flagged_mask].float().mean() >= 0.9


def test_spectre_deterministic_and_float32():
    x, is_poison, _, _ = _planted(seed=2)
    rf = 1.5 * N_POISON / x.shape[0]
    r1 = spectre_filter(x, rf)
    r2 = spectre_filter(x, rf)
    assert r1.k == r2.k
    assert torch.equal(r1.scores, r2.scores)
    assert torch.equal(r1.flagged_mask, r2.flagged_mask)
    r32 = spectre_filter(x.float(), rf)
    assert r32.scores.shape == (x.shape[0],) and torch.isfinite(r32.scores).all()
    assert int(r32.flagged_mask.sum()) == round(rf * x.shape[0])
    assert (r32.flagged_mask & is_poison).sum() >= 0.9 * N_POISON


def test_spectre_scores_mask_and_ks():
    x, is_poison, _, _ = _planted(seed=3)
    pf = N_POISON / x.shape[0]
    res = spectre_scores(x, pf, ks=[1, 4, 49, 10_000])  # 10_000 exceeds the dims and is dropped
    assert set(res.criteria) == {1, 4, 49}
    assert int(res.flagged_mask.sum()) == round(1.5 * pf * x.shape[0])
    assert torch.equal(res.flagged_mask, _top_mask(res.scores, int(res.flagged_mask.sum())))
    with pytest.raises(ValueError):
        spectre_scores(x, pf, ks=[0, 10_000])


def test_spectre_on_clean_gaussian():
    g = torch.Generator().manual_seed(4)
    n = 1060
    x = torch.randn(n, DIM, generator=g) * torch.logspace(0.5, -0.5, DIM)
    res = spectre_filter(x, 0.085)
    assert res.scores.shape == (n,) and torch.isfinite(res.scores).all()
    assert int(res.flagged_mask.sum()) == round(0.085 * n)
    # i.i.d. data: flags spread over the index range, and no k shows the separation a real cluster gives
    first_half = res.flagged_mask[: n // 2].float().mean()
    second_half = res.flagged_mask[n // 2:].float().mean()
    assert abs(first_half - second_half) < 0.05
    xp, _, _, _ = _planted()
    res_p = spectre_filter(xp, 1.5 * N_POISON / xp.shape[0])
    assert max(res.criteria.values()) < 1.6 < res_p.criteria[res_p.k]


def test_spectre_edge_cases():
    x = torch.randn(3, 5)
    res = spectre_filter(x, 0.4)
    assert res.scores.shape == (3,) and int(res.flagged_mask.sum()) == 1
    res0 = spectre_filter(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), 0.0)
    assert int(res0.flagged_mask.sum()) == 0
    with pytest.raises(ValueError):
        spectre_filter(torch.randn(10, 3), 1.5)


def test_robust_mean_cov_excludes_cluster():
    x, _, v, clean_var = _planted(seed=5, poison_scale=0.5)
    mu, cov = robust_mean_cov(x, N_POISON / x.shape[0])
    assert mu.dtype == torch.float64 and cov.shape == (DIM, DIM)
    xc = x - x.mean(0)
    plain_var = (v @ (xc.T @ xc / len(x)) @ v).item()
    robust_var = (v @ cov @ v).item()
    assert plain_var > 2.0 * clean_var  # the cluster inflates the plain estimate along v ...
    assert 0.6 * clean_var < robust_var < 1.4 * clean_var  # ... the robust one is close to the clean variance
    assert abs((mu @ v).item()) < 0.5 * clean_var ** 0.5


def test_robust_mean_cov_on_gaussian_is_consistent():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    mu, cov = robust_mean_cov(x, 0.05)
    assert torch.allclose(cov.diagonal(), torch.tensor([9.0, 4.0, 1.0, 0.25], dtype=torch.float64), rtol=0.15)
    assert mu.abs().max() < 0.2


def test_que_scores():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(500, 6, generator=g, dtype=torch.float64)
    y = (y - y.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(y.T, correction=0))).T
    # exactly whitened → ‖Σ'‖₂ = 1 → M = I/k → Mahalanobis / k
    assert torch.allclose(que_scores(y), y.square().sum(1) / 6, atol=1e-9)
    # a spike along axis 0: the QUE scores concentrate on it
    z = torch.randn(500, 6, generator=g, dtype=torch.float64)
    z[:25, 0] += 5.0
    s = que_scores(z, alpha=4.0)
    assert s.shape == (500,) and (s >= 0).all()
    assert _top_mask(s, 25)[:25].float().mean() >= 0.9
    # k = 1 and float32 input
    assert que_scores(torch.randn(10, 1)).shape == (10,)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def test_layer_representations():
    torch.manual_seed(0)
    net = _Net().train()
    net.head.eval()  # mixed modes must be restored exactly
    batches = [torch.randn(3, 3, 8, 8), (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    reps = layer_representations(net, "pool", batches)
    assert reps.shape == (5, 16) and reps.dtype == torch.float32 and reps.device.type == "cpu"
    feats = layer_representations(net, "features.2", batches)
    assert feats.shape == (5, 4 * 8 * 8)
    assert net.training and net.features.training and not net.head.training
    for mod in net.modules():
        assert len(mod._forward_hooks) == 0
    # eval mode was used: BN running stats untouched, outputs match a manual eval forward
    net.eval()
    with torch.no_grad():
        ref = net.pool(net.features(batches[0])).flatten(1)
    assert torch.allclose(reps[:3], ref, atol=1e-6)


def test_layer_representations_errors_and_cleanup():
    net = _Net().train()
    with pytest.raises(ValueError, match="features"):
        layer_representations(net, "nope", [torch.randn(1, 3, 8, 8)])

    def bad_batches():
        yield torch.randn(2, 3, 8, 8)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        layer_representations(net, "pool", bad_batches())
    assert net.training
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
