"""AFT's reversed trigger: the search finds a planted trigger's place, the stamp keeps labels, and AFT records it."""
import json

import pytest
import torch
from torch import nn

from conftest import NO_FIGURES, cli
from utils.defenses.aft import reversal_due
from utils.defenses.trigger_reversal import ReversedTrigger, StampShare, reverse_trigger

pytestmark = pytest.mark.usefixtures("one_thread")


class SquareBackdoor(nn.Module):
    """Class 1's logit rises with the brightness of the 3x3 square at rows 20-22, columns 5-7 and wins above about
    0.8; class 0's is 4 x the image's mean brightness."""

    def forward(self, x):
        square = x[:, :, 20:23, 5:8].mean(dim=(1, 2, 3))
        return torch.stack([4 * x.mean(dim=(1, 2, 3)), 20 * square - 15], 1)


def test_the_reversed_mask_is_the_planted_square():
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3
    trig = reverse_trigger(SquareBackdoor(), x, target=1, steps=200)
    assert trig.success >= 0.9
    on_square = trig.mask[0, 0, 20:23, 5:8].sum()
    # the mask's mass sits on the 9 pixels that reach class 1 (a mask left where it started, 0.047 everywhere,
    # would be 1,024 x 0.047 = 48 pixels' worth spread over the image)
    assert trig.mask.sum() < 2 * on_square and on_square > 4
    with torch.no_grad():
        assert (SquareBackdoor()(trig.stamp(x)).argmax(1) == 1).float().mean() >= 0.9
    rec = trig.record()
    assert rec["target"] == 1 and rec["mask_mean"] < 0.02 and rec["success"] == round(trig.success, 4)


def test_stamp_share_stamps_the_first_share_and_keeps_the_rest():
    trig = ReversedTrigger(torch.zeros(1, 1, 4, 4), torch.ones(1, 3, 4, 4), 0, 1.0)
    trig.mask[..., 0, 0] = 1.0
    x = torch.zeros(10, 3, 4, 4)
    out = StampShare(trig, 0.3)(None, x, torch.zeros(10, dtype=torch.long))
    assert out[:3, :, 0, 0].eq(1).all() and out[3:].eq(0).all() and out[:3, :, 1:].eq(0).all()
    assert x.eq(0).all()  # the batch itself is left alone


def test_the_stamp_is_reversed_again_every_n_clean_epochs():
    # 3 PGD epochs, again every 9 clean ones: before epochs 13 and 22 (the first, from the infected model, is before 1)
    assert [e for e in range(1, 31) if reversal_due(e, 3, 9)] == [13, 22]
    assert not any(reversal_due(e, 3, 0) for e in range(1, 31))


@pytest.mark.slow
def test_aft_records_the_vote_and_every_reversal_and_stamps_the_clean_epochs(infected_run, tmp_path, capsys,
                                                                            monkeypatch):
    import pbe_main

    stamped = []  # (batch size, images the stamp changed) of every clean batch
    call = StampShare.__call__

    def counting(self, model, x, y, generator=None):
        out = call(self, model, x, y, generator)
        stamped.append((len(x), int((out != x).flatten(1).any(1).sum())))
        return out

    monkeypatch.setattr(StampShare, "__call__", counting)
    out = tmp_path / "aft-reverse"
    # with the window search too (tests/test_window_search.py's end-to-end part: one AFT run for both)
    assert cli(pbe_main.main, "--model_path", infected_run / "model.pt", "--aft_epochs", "3", "--adv_epochs", "1",
               "--adv_window", "5", "--adv_eps", "1", "--adv_alpha", "1/4", "--adv_random_start",
               "--adv_eps_outside", "6/255", "--window_search", "3",
               "--reverse_every", "1", "--reverse_steps", "20", "--out_dir", out, "--test_subset", "200",
               "--eval_steps", "2", "--device", "cpu", *NO_FIGURES) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    rev = s["settings"]["trigger_reversal"]
    assert rev["every"] == 1 and rev["steps"] == 20 and sum(rev["vote"]["votes"]) == s["settings"]["extra_size"]
    # the patch model's vote: class 0 (its target) with about 40 % of the 100 extra-set images, not weak (20 %)
    assert rev["vote"]["estimate"] == 0 and not rev["vote"]["weak"]
    # from the infected model, then again before the second clean epoch (epoch 3)
    assert [x["epoch"] for x in rev["reversals"]] == [0, 2] and all(x["target"] == 0 for x in rev["reversals"])
    assert s["stages"]["seconds"]["trigger_reversal"] > 0 and "trigger reversal: the PGD vote" in printed
    # the two clean epochs' batches (100 images each in batches of 64 or fewer), a fifth of each stamped; never the PGD
    # epoch's
    assert sum(n for n, _ in stamped) == 2 * s["settings"]["extra_size"]
    assert all(k == round(0.2 * n) for n, k in stamped)
    found = s["settings"]["window_search"]["found"]
    assert len(found) == 3 and found[0][2] >= found[1][2] >= found[2][2]
    assert s["settings"]["pgd"]["window_at"] == [[int(t), int(l)] for t, l, _ in found]
    assert s["stages"]["seconds"]["window_search"] > 0 and "window search: the top 3" in printed
