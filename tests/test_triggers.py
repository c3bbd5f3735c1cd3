import pytest
import torch

from utils.run.errors import UserError
from utils.data.triggers import TRIGGERS, backdoor_labels, build_trigger, trigger_from_state

SHAPES = [(3, 32, 32), (1, 28, 28), (3, 40, 48), (3, 64, 64)]


def batch(shape, n=6, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_patch_changes_only_its_corner(shape):
    c, h, w = shape
    trig = build_trigger("patch", shape)
    x = batch(shape)
    out = trig(x)
    s = trig.params["patch_size"]
    changed = (out != x).any(dim=1)  # (n, h, w)
    corner = torch.zeros(h, w, dtype=torch.bool)
    corner[h - 3 * s:, w - 3 * s:] = True
    assert not changed[:, ~corner].any()
    expected = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float32)
    expected = expected.repeat_interleave(s, 0).repeat_interleave(s, 1)
    assert torch.equal(out[:, :, h - 3 * s:, w - 3 * s:], expected.expand(6, c, -1, -1))


def test_patch_size_scales_cells():
    trig = build_trigger("patch", (3, 64, 64), patch_size=3)
    out = trig(torch.full((1, 3, 64, 64), 0.5))
    assert (out != 0.5).any(dim=1)[0].sum() == 81


@pytest.mark.parametrize("shape", SHAPES)
def test_blend_moves_every_pixel_by_alpha_times_difference(shape):
    trig = build_trigger("blend", shape, blend_alpha=0.1)
    x = batch(shape)
    img = trig.tensors["image"]
    assert torch.allclose(trig(x) - x, 0.1 * (img - x), atol=1e-6)


def test_sig_adds_a_horizontal_sine_and_clamps():
    shape = (3, 32, 32)
    trig = build_trigger("sig", shape, sig_delta=20 / 255, sig_freq=6)
    x = torch.full((2, *shape), 0.5)
    d = trig(x) - x
    j = torch.arange(32, dtype=torch.float32)
    expected = (20 / 255) * torch.sin(2 * torch.pi * j * 6 / 32)
    assert torch.allclose(d[0, 1, 7], expected, atol=1e-6)
    assert torch.allclose(d, d[:, :, :1, :].expand_as(d))  # same in every row: stripes vary along columns only
    assert trig(torch.ones(1, *shape)).max() <= 1.0 and trig(torch.zeros(1, *shape)).min() >= 0.0


def test_warp_moves_pixels_and_noise_mode_differs():
    shape = (3, 32, 32)
    trig = build_trigger("warp", shape, seed=3)
    x = batch(shape)
    w = trig(x)
    assert (w - x).abs().mean() > 1e-3
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(trig.apply_noise(x, g), w)
    # s = 0 is the identity warp
    ident = build_trigger("warp", shape, seed=3, s=0.0)
    assert torch.allclose(ident(x), x, atol=1e-5)


@pytest.mark.parametrize("name", list(TRIGGERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_trigger_stays_in_range_and_keeps_shape(name, shape):
    trig = build_trigger(name, shape, seed=1)
    for x in (batch(shape), torch.zeros(3, *shape), torch.ones(3, *shape)):
        out = trig(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_deterministic_for_a_seed_and_rebuilt_bit_exactly_from_a_saved_state(name, tmp_path):
    shape = (3, 32, 32)
    a, b = build_trigger(name, shape, seed=5), build_trigger(name, shape, seed=5)
    x = batch(shape)
    assert torch.equal(a(x), b(x))
    path = tmp_path / "t.pt"
    torch.save({"trigger": a.state()}, path)
    rebuilt = trigger_from_state(torch.load(path)["trigger"])
    assert torch.equal(rebuilt(x), a(x))
    if name == "warp":
        assert not torch.equal(build_trigger(name, shape, seed=6)(x), a(x))


def test_trigger_rejects_wrong_input_shape():
    trig = build_trigger("blend", (3, 32, 32))
    with pytest.raises(ValueError):
        trig(torch.rand(2, 1, 32, 32))


def test_unknown_trigger_and_oversized_patch_are_user_errors():
    with pytest.raises(UserError, match="unknown trigger"):
        build_trigger("nope", (3, 32, 32))
    with pytest.raises(UserError, match="patch_size"):
        build_trigger("patch", (3, 32, 32), patch_size=11)


def test_blend_image_file_is_loaded_and_resized(tmp_path):
    from PIL import Image
    import numpy as np

    p = tmp_path / "img.png"
    Image.fromarray(np.full((50, 70, 3), 255, dtype=np.uint8)).save(p)
    trig = build_trigger("blend", (3, 32, 32), blend_image=str(p), blend_alpha=0.5)
    assert torch.allclose(trig(torch.zeros(1, 3, 32, 32)), torch.full((1, 3, 32, 32), 0.5))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="cannot read --blend_image"):
        build_trigger("blend", (3, 32, 32), blend_image=str(bad))


def test_label_maps():
    y = torch.tensor([0, 1, 5, 9])
    assert backdoor_labels(y, "all2one", 3, 10).tolist() == [3, 3, 3, 3]
    assert backdoor_labels(y, "all2all", 0, 10).tolist() == [1, 2, 6, 0]
    assert backdoor_labels(torch.tensor([42]), "all2all", 0, 43).tolist() == [0]
    with pytest.raises(UserError):
        backdoor_labels(y, "one2one", 0, 10)
