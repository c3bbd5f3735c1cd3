"""PGD's attack view (models/folding.py): conv->BN folded, eval-mode equivalent, always in step with the model."""
import pytest
import torch
import torch.nn.functional as F

import models.folding as folding
import utils.adversarial as adv
from models import build_model


def _model(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.rand(16, 3, 32, 32)
    for _ in range(3):  # non-trivial BN statistics and affine parameters
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["cnn", "preactresnet18"])
def test_view_equals_the_eval_mode_model_and_follows_training(arch):
    model, opt = _model(arch)
    view = folding.attack_view(model)
    assert view is not model and any(isinstance(m, folding._FoldedConvBN) for m in view.modules())
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(view(x), model(x), atol=1e-4, rtol=1e-4)
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4]))  # weights and BN statistics change
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert folding.attack_view(model) is view  # cached, yet live
        assert torch.allclose(view(x), model(x), atol=1e-4, rtol=1e-4)


def test_pgd_through_the_view_matches_pgd_on_the_model():
    model, _ = _model("cnn")
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model.train()
    fast = adv.pgd(model, x, y, 8 / 255, 2 / 255, 5, random_start=False)
    assert model.training and all(m.training for m in model.modules())
    folding.FOLD_BN = False
    try:
        plain = adv.pgd(model, x, y, 8 / 255, 2 / 255, 5, random_start=False)
    finally:
        folding.FOLD_BN = True
    # float rounding can flip the sign of a near-zero gradient component; nearly every pixel agrees
    assert (fast == plain).float().mean() > 0.97
    assert (fast - x).abs().max() <= 8 / 255 + 1e-6
    model.eval()
    with torch.no_grad():
        agree = (model(fast).argmax(1) == model(plain).argmax(1)).float().mean()
    assert agree >= 0.9


def test_param_grads_untouched_and_bf16_view_returns_float32():
    model, opt = _model("cnn")
    opt.zero_grad(set_to_none=True)
    model.amp_dtype = torch.bfloat16
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = adv.pgd(model, x, y, 8 / 255, 2 / 255, 2)
    assert out.dtype == torch.float32 and all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert folding.attack_view(model)(x).dtype == torch.float32


def test_models_that_are_not_ours_are_attacked_directly():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    assert folding.attack_view(net) is net
