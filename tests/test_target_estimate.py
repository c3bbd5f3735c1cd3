"""The sequential target estimate: a decisive vote stops early, a spread one attacks every image."""
import pytest
import torch
import torch.nn as nn

from utils.data.datasets import make_synthetic
from utils.defenses.target import TargetSettings, decisive, estimate_target, settled


def test_the_sequential_test_settles_a_clear_vote_and_not_a_spread_or_thin_one():
    # votes of 100 images, K = 10, at most 10 looks
    assert settled(torch.tensor([90, 3, 2, 1, 1, 1, 1, 1, 0, 0]), looks=10, error=1e-3)
    assert not settled(torch.tensor([12, 10, 11, 9, 8, 10, 10, 10, 10, 10]), looks=10, error=1e-3)
    assert not settled(torch.tensor([5, 0, 0, 0, 0, 0, 0, 0, 0, 0]), looks=10, error=1e-3)  # too few votes
    # decisive as counted (62 >= 2 x 30) but not beyond doubt: more images are needed
    assert decisive({"votes": [62, 30, 8], "weak": False}) and not settled(torch.tensor([62, 30, 8]), 10, 1e-3)
    # a smaller error bound needs more votes
    clear = torch.tensor([60, 2, 1, 1, 1, 1, 1, 1, 1, 1])
    assert settled(clear, 10, 1e-2) and not settled(clear, 10, 1e-9)


class Fixed(nn.Module):
    """Logits of a fixed linear map; ``bias`` makes one class win everywhere (PGD cannot move a zero map)."""

    def __init__(self, weight_scale: float, bias: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(3 * 32 * 32, 10)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)) * weight_scale)
            self.lin.bias.copy_(bias)

    def forward(self, x):
        return self.lin(x.flatten(1) - 0.5)


@pytest.mark.parametrize("error", [1e-3, 0.0])
def test_a_decisive_vote_stops_at_the_first_look_and_a_spread_one_does_not(error):
    data = make_synthetic(1000, seed=3)
    settings = TargetSettings(target_images=1000, target_error=error, target_look=100)
    clear = Fixed(0.0, torch.tensor([5.0] + [0.0] * 9))  # every image votes for class 0
    spread = Fixed(1.0, torch.zeros(10))  # random images over a random map: votes over every class
    rec = estimate_target(clear, data, settings, 10, 512, torch.Generator().manual_seed(1), False)
    assert rec["estimate"] == 0 and decisive(rec) and rec["images_planned"] == 1000
    assert sum(rec["votes"]) == rec["images"]
    if error:
        assert rec["images"] == 100 and rec["sequential"]["stopped_early"] and rec["sequential"]["looks"] == 1
    else:
        assert rec["images"] == 1000 and "sequential" not in rec
    rec = estimate_target(spread, data, settings, 10, 512, torch.Generator().manual_seed(1), False)
    assert rec["images"] == 1000 and not decisive(rec) and sum(rec["votes"]) == 1000
    if error:
        assert not rec["sequential"]["stopped_early"] and rec["sequential"]["looks"] == 10
