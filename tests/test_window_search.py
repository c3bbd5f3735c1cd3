"""AFT's window search: it ranks the window a model reacts to first, and the PGD puts half its windows there."""

import pytest
import torch
from torch import nn

from utils.adversarial import WINDOW_AT_SHARE, _window_mask
from utils.defenses.window_search import rank_windows


class SquareDetector(nn.Module):
    """Class 1's logit is the brightness of the 3x3 square at rows 20-22, columns 5-7 (a planted 'trigger')."""

    def forward(self, x):
        bright = x[:, :, 20:23, 5:8].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(bright), 20 * bright - 5], 1)


def test_the_window_holding_the_planted_square_ranks_first():
    x = torch.zeros(8, 3, 32, 32)
    y = torch.zeros(8, dtype=torch.long)
    pos, loss = rank_windows(SquareDetector(), x, y, k=5, stride=3, generator=torch.Generator().manual_seed(0))
    # (18, 3) is the one grid position whose 5x5 window holds the whole square; the losses are sorted
    assert pos[0].tolist() == [18, 3]
    assert torch.all(loss[:-1] >= loss[1:]) and loss[0] > loss[1]
    assert len(pos) == 10 * 10  # 0, 3, ..., 27 on each axis (27 = 32 - 5, the last start)


def test_window_at_places_about_half_the_windows_at_the_given_positions():
    x = torch.zeros(400, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    at = torch.tensor([[0, 0], [27, 27]])
    m = _window_mask(x, 5, gen, at)
    at_00 = m[:, 0, 0, 0] == 1
    at_2727 = m[:, 0, 31, 31] == 1
    share = (at_00 | at_2727).float().mean().item()
    # placed: WINDOW_AT_SHARE (0.5); by chance a uniform window lands on one of the two in 2 of 784
    assert abs(share - WINDOW_AT_SHARE) < 0.08 and at_00.any() and at_2727.any()
    assert m.sum(dim=(1, 2, 3)).eq(25).all()  # still one 5x5 window per image
    plain = _window_mask(x, 5, torch.Generator().manual_seed(0))
    assert (plain[:, 0, 0, 0] == 1).float().mean() < 0.02
    with pytest.raises(ValueError, match="window positions must lie"):
        _window_mask(x, 5, gen, torch.tensor([[28, 0]]))


# the search end to end (run, recorded, its positions given to the PGD) is asserted with the reversed trigger in one
# AFT run: tests/test_trigger_reversal.py
