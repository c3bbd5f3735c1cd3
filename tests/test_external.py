"""utils.data.external: other code's weights, tensor files, image folders, poison lists and BackdoorBench results.

Every file is written by the test itself; nothing is downloaded.
"""
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

import utils.data.external as ext
from models import build_model
from utils.data.datasets import ImageSet
from utils.run.errors import UserError
from utils.data.external import (fit_state_dict, load_weights, read_backdoorbench, read_image_folder,
                            read_poison_indices, read_tensor_file)

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert match in msg, msg
    return msg


# ----- weights ------------------------------------------------------------------------------------

def foreign_preact(model, prefix: str = "") -> OrderedDict:
    """Our PreActResNet18's weights under the names kuangliu / WaNet / BackdoorBench code gives them."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        if k.startswith("net."):
            out[prefix + k[4:].replace(".shortcut.", ".shortcut.0.")] = v.clone()
    return out


@pytest.fixture(scope="module")
def preact():
    torch.manual_seed(0)
    m = build_model("preactresnet18", 10)
    with torch.no_grad():  # non-trivial BN statistics, so a buffer mix-up would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.num_batches_tracked.fill_(7)
    return m


def assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", ["kuangliu", "wanet", "backdoorbench", "plain_ours"])
def test_other_codes_preactresnet18_loads_bit_exactly(tmp_path, preact, wrap):
    if wrap == "kuangliu":  # main.py: {'net': DataParallel state dict, 'acc', 'epoch'}
        obj = {"net": foreign_preact(preact, "module."), "acc": 93.1, "epoch": 199}
    elif wrap == "wanet":  # train.py: {'netC', 'optimizerC', ..., 'identity_grid', 'noise_grid'}
        obj = {"netC": foreign_preact(preact), "best_clean_acc": torch.tensor(94.0), "epoch_current": 3,
               "identity_grid": torch.zeros(1, 32, 32, 2), "optimizerC": {"state": {}, "param_groups": [{"lr": 0.01}]}}
    elif wrap == "backdoorbench":  # a plain state dict (its avgpool has no parameters)
        obj = foreign_preact(preact)
    else:
        obj = {"state_dict": preact.state_dict()}
    f = tmp_path / "w.pt"
    torch.save(obj, f)
    fitted = fit_state_dict(load_weights(str(f)), "preactresnet18", 10)
    assert_same_state(fitted, preact.state_dict())
    fresh = build_model("preactresnet18", 10)
    fresh.load_state_dict(fitted)  # strict


def test_torchvision_resnet18_fits_our_resnet18():
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    fitted = fit_state_dict(tv.state_dict(), "resnet18", 10, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    for k, v in tv.state_dict().items():
        assert torch.equal(fitted["net." + k], v)
    assert torch.equal(fitted["normalize.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    build_model("resnet18", 10).load_state_dict(fitted)


def test_unmappable_keys_name_missing_unexpected_and_arch(preact):
    sd = foreign_preact(preact)
    sd["classifier.weight"], sd["classifier.bias"] = sd.pop("linear.weight"), sd.pop("linear.bias")
    msg = one_line_error(fit_state_dict, sd, "preactresnet18", 10, match="arch 'preactresnet18'")
    assert "2 missing (net.linear.weight, net.linear.bias)" in msg and "2 unexpected (classifier.weight" in msg


def test_a_final_batchnorm_is_diagnosed_as_such(preact):
    sd = foreign_preact(preact)
    for p in ("weight", "bias", "running_mean", "running_var"):
        sd[f"bn.{p}"] = torch.ones(512)
    one_line_error(fit_state_dict, sd, "preactresnet18", 10, match="final BatchNorm 'bn'")


def test_class_count_mismatch_names_num_classes(preact):
    one_line_error(fit_state_dict, foreign_preact(preact), "preactresnet18", 43, match="pass --num_classes 10")
    one_line_error(fit_state_dict, foreign_preact(preact), "preactresnet18", 10, in_channels=1,
                   match="conv1.weight has shape (64, 3, 3, 3)")


class Payload:
    """Unpickling this creates ``path``: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickles_are_refused_without_the_opt_in_and_never_run(tmp_path, preact):
    whole = tmp_path / "whole.pt"
    torch.save(preact, whole)
    one_line_error(load_weights, str(whole), match="--allow_pickle")
    assert_same_state(load_weights(str(whole), allow_pickle=True), preact.state_dict())

    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"state_dict": preact.state_dict(), "extra": Payload(marker)}, evil)
    msg = one_line_error(load_weights, str(evil), match="pickled Python objects")
    assert "--allow_pickle" in msg and "trust" in msg
    assert not marker.exists()
    one_line_error(read_tensor_file, str(evil), match="pickled")
    one_line_error(read_poison_indices, str(evil), 10, match="pickled")
    one_line_error(read_backdoorbench, str(evil), str(tmp_path), match="pickled")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: a reader that unpickled it would have run it
    assert marker.exists()


def test_weight_files_that_are_not_state_dicts(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"epoch": 3, "acc": 0.9}, f)
    one_line_error(load_weights, str(f), match="without a state dict (keys: epoch, acc)")
    f.write_bytes(b"not a torch file at all")
    one_line_error(load_weights, str(f), match="not a")
    one_line_error(load_weights, str(tmp_path / "absent.pt"), match="does not exist")


# ----- tensor files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 6, 7), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.tensor([0, 3, 1, 3, 2]), 4)


def forms(s: ImageSet):
    nhwc = s.x.permute(0, 2, 3, 1)
    return {
        "pt_uint8_nchw.pt": (s.x, s.y),
        "pt_uint8_nhwc.pt": (nhwc.contiguous(), s.y),
        "pt_float01_nchw.pt": (s.x.float() / 255, s.y.int()),
        "pt_float255_nhwc.pt": (nhwc.double(), s.y),
        "pt_int64_nchw.pt": (s.x.long(), s.y),
        "npz_uint8_nhwc.npz": (nhwc.numpy(), s.y.numpy()),
        "npz_float01_nchw.npz": ((s.x.float() / 255).numpy(), s.y.numpy().astype(np.int32)),
    }


def save_xy(path, x, y):
    if str(path).endswith(".npz"):
        np.savez(path, x=x, y=y)
    else:
        torch.save({"x": x, "y": y}, path)


def test_every_accepted_tensor_form_round_trips(tmp_path, small_set):
    for name, (x, y) in forms(small_set).items():
        save_xy(tmp_path / name, x, y)
        got = read_tensor_file(str(tmp_path / name), num_classes=4)
        assert got.x.dtype == torch.uint8 and torch.equal(got.x, small_set.x), name
        assert got.y.dtype == torch.long and torch.equal(got.y, small_set.y), name
        assert got.num_classes == 4
    assert read_tensor_file(str(tmp_path / "pt_uint8_nchw.pt")).num_classes == 4  # largest label + 1
    gray = small_set.x[:, 0]
    save_xy(tmp_path / "gray.pt", gray, small_set.y)  # N x H x W: one channel
    assert torch.equal(read_tensor_file(str(tmp_path / "gray.pt")).x, gray[:, None])


@pytest.mark.parametrize("case,match", [
    ("no_y", "lacks 'y'"), ("float_y", "integer labels"), ("four_channels", "1 or 3 channels"),
    ("five_dims", "expected N x C x H x W"), ("empty", "holds no images"), ("label_too_big", "outside [0, 3)"),
    ("negative_label", "outside [0,"), ("over_255", "span [0, 510]"), ("nan", "NaN"), ("lengths", "5 images but 4"),
    ("bool_x", "dtype torch.bool"), ("extension", "extension '.csv'"), ("not_a_dict", "expected a dict"),
    ("npz_object", "without pickle"), ("missing", "does not exist"),
])
def test_each_bad_tensor_file_gives_its_one_line_error(tmp_path, small_set, case, match):
    x, y = small_set.x, small_set.y
    f, num_classes = tmp_path / "d.pt", None
    if case == "no_y":
        torch.save({"x": x, "labels": y}, f)
    elif case == "float_y":
        save_xy(f, x, y.float())
    elif case == "four_channels":
        save_xy(f, torch.zeros(5, 4, 6, 7, dtype=torch.uint8), y)
    elif case == "five_dims":
        save_xy(f, x[None], y)
    elif case == "empty":
        save_xy(f, x[:0], y[:0])
    elif case == "label_too_big":
        save_xy(f, x, y)
        num_classes = 3
    elif case == "negative_label":
        save_xy(f, x, y - 1)
    elif case == "over_255":
        save_xy(f, x.float() * 2, y)
    elif case == "nan":
        xf = x.float()
        xf[0, 0, 0, 0] = float("nan")
        save_xy(f, xf, y)
    elif case == "lengths":
        save_xy(f, x, y[:4])
    elif case == "bool_x":
        save_xy(f, x > 100, y)
    elif case == "extension":
        f = tmp_path / "d.csv"
        f.write_text("x,y\n")
    elif case == "not_a_dict":
        torch.save([x, y], f)
    elif case == "npz_object":
        f = tmp_path / "d.npz"
        np.savez(f, x=np.array([x.numpy(), None], dtype=object), y=y.numpy())
    elif case == "missing":
        f = tmp_path / "absent.pt"
    one_line_error(read_tensor_file, str(f), num_classes=num_classes, match=match)


# ----- image folders ------------------------------------------------------------------------------

def write_folder(root, classes: dict, size=(7, 5), mode="RGB", seed=0):
    """classes: name -> image count; returns {path: array} of what was written (PNG: lossless)."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in classes.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            p = root / name / f"img{i}.png"
            Image.fromarray(arr, mode).save(p)
            written[str(p)] = arr
    return written


def test_image_folder_round_trips_with_sorted_class_labels(tmp_path):
    written = write_folder(tmp_path / "rgb", {"dog": 2, "cat": 3})
    s, paths, classes = read_image_folder(str(tmp_path / "rgb"))
    assert classes == ["cat", "dog"] and s.num_classes == 2
    assert paths == sorted(written, key=lambda p: (os.path.basename(os.path.dirname(p)), p))
    assert s.x.shape == (5, 3, 5, 7) and s.x.dtype == torch.uint8
    assert s.y.tolist() == [0, 0, 0, 1, 1]
    for i, p in enumerate(paths):
        assert torch.equal(s.x[i], torch.from_numpy(written[p]).permute(2, 0, 1))
    gw = write_folder(tmp_path / "gray", {"a": 1, "b": 1}, mode="L")
    g, gpaths, _ = read_image_folder(str(tmp_path / "gray"))
    assert g.x.shape == (2, 1, 5, 7) and torch.equal(g.x[1, 0], torch.from_numpy(gw[gpaths[1]]))


def test_image_folder_errors_and_resizing(tmp_path):
    os.makedirs(tmp_path / "empty")
    one_line_error(read_image_folder, str(tmp_path / "empty"), match="no class folders")
    os.makedirs(tmp_path / "noimg" / "cls")
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("x")
    one_line_error(read_image_folder, str(tmp_path / "noimg"), match="holds no images")
    write_folder(tmp_path / "mixed", {"a": 2})
    write_folder(tmp_path / "mixed", {"b": 1}, size=(9, 9), seed=1)
    msg = one_line_error(read_image_folder, str(tmp_path / "mixed"), match="is 9x9 but")
    assert os.path.join("b", "img0.png") in msg and "--image_size" in msg
    s, _, _ = read_image_folder(str(tmp_path / "mixed"), size=8)
    assert s.x.shape == (3, 3, 8, 8)
    (tmp_path / "mixed" / "b" / "broken.png").write_bytes(b"no png")
    one_line_error(read_image_folder, str(tmp_path / "mixed"), size=8, match="broken.png' cannot be decoded")


# ----- poison indices -----------------------------------------------------------------------------

def test_poison_indices_from_text_vectors_and_masks(tmp_path):
    (tmp_path / "p.txt").write_text("# poisoned\n7\n\n2\n5  # late\n")
    assert read_poison_indices(str(tmp_path / "p.txt"), 10).tolist() == [2, 5, 7]
    torch.save(torch.tensor([9, 0, 4]), tmp_path / "p.pt")
    assert read_poison_indices(str(tmp_path / "p.pt"), 10).tolist() == [0, 4, 9]
    mask = np.zeros(10)
    mask[[1, 3]] = 1  # BackdoorBench's poison_indicator: a float 0/1 vector
    np.save(tmp_path / "m.npy", mask)
    assert read_poison_indices(str(tmp_path / "m.npy"), 10).tolist() == [1, 3]
    torch.save(torch.tensor(mask) > 0, tmp_path / "b.pt")
    assert read_poison_indices(str(tmp_path / "b.pt"), 10).tolist() == [1, 3]
    one_line_error(read_poison_indices, str(tmp_path / "b.pt"), 12, match="length 10, the training set 12")
    one_line_error(read_poison_indices, str(tmp_path / "p.pt"), 9, match="outside the training set's [0, 9)")
    (tmp_path / "d.txt").write_text("1\n1\n")
    one_line_error(read_poison_indices, str(tmp_path / "d.txt"), 9, match="more than once")
    (tmp_path / "w.txt").write_text("1\nseven\n")
    one_line_error(read_poison_indices, str(tmp_path / "w.txt"), 9, match="line 2: 'seven'")


# ----- BackdoorBench ------------------------------------------------------------------------------

N_TRAIN, N_TEST, TARGET = 24, 12, 0
POISON = [2, 5, 11, 17]


def trigger(x: torch.Tensor) -> torch.Tensor:
    """A BadNets-like white 3x3 corner on uint8 NCHW images."""
    x = x.clone()
    x[..., -3:, -3:] = 255
    return x


@pytest.fixture(scope="module")
def clean_sets():
    g = torch.Generator().manual_seed(3)
    train = ImageSet(torch.randint(0, 256, (N_TRAIN, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (N_TRAIN,), generator=g), 10)
    test = ImageSet(torch.randint(0, 256, (N_TEST, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(N_TEST) % 10, 10)
    return train, test


def bb_dataset_state(clean: ImageSet, poison_idx, subset, save_folder, run_dir):
    """A prepro_cls_DatasetBD_v2.retrieve_state() as BackdoorBench's attacks leave it: poison_indicator a float
    0/1 array, original_index_array an int64 arange (subset for bd_test), and a poisonedCLSDataContainer
    whose data_dict maps numpy int64 indices to (PIL image, backdoor label, original label) -- or, with a
    save folder, to {"path": '<folder>/<original label>/<index>.png', "other_info": [backdoor label, label]}."""
    indicator = np.zeros(len(clean))
    indicator[poison_idx] = 1
    data_dict = {}
    for i in np.arange(len(clean))[indicator == 1]:  # numpy int64 keys, as prepro_backdoor iterates them
        img = Image.fromarray(trigger(clean.x[i]).permute(1, 2, 0).numpy())
        label = int(clean.y[i])
        if save_folder is None:
            data_dict[i] = (img, TARGET, label)
        else:
            rel = f"{save_folder}/{label}/{i}.png"
            os.makedirs(run_dir / os.path.basename(save_folder) / str(label), exist_ok=True)
            img.save(run_dir / os.path.basename(save_folder) / str(label) / f"{i}.png")
            data_dict[i] = {"path": rel, "other_info": [TARGET, label]}
    order = np.arange(len(clean))
    return {"bd_data_container": {"save_folder_path": save_folder, "data_dict": data_dict, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": order if subset is None else order[subset],
            "poison_indicator": indicator, "save_folder_path": save_folder}


def write_attack_result(run_dir, clean_sets, model, on_disk: bool, legacy_numpy1: bool = False, **override):
    """attack_result.pt with save_attack_result's keys (BackdoorBench v2), as badnet.py calls it."""
    train, test = clean_sets
    run_dir.mkdir(parents=True, exist_ok=True)
    save = "./record/badnet_0_1" if on_disk else None
    test_idx = np.flatnonzero(test.y.numpy() != TARGET)  # bd_test.subset(non-target samples)
    payload = {
        "model_name": "preactresnet18", "num_classes": 10, "model": foreign_preact(model, "module."),
        "data_path": "../data/cifar10", "img_size": (32, 32, 3), "clean_data": "cifar10",
        "bd_train": bb_dataset_state(train, POISON, None, save and f"{save}/bd_train_dataset", run_dir),
        "bd_test": bb_dataset_state(test, test_idx, test_idx, save and f"{save}/bd_test_dataset", run_dir),
        **override,
    }
    f = run_dir / "attack_result.pt"
    if legacy_numpy1:  # a file written under numpy 1.x names numpy.core.multiarray (text GLOBALs: patchable)
        torch.save(payload, f, _use_new_zipfile_serialization=False)
        f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    else:
        torch.save(payload, f)
    return f, test_idx


@pytest.fixture
def fake_clean(monkeypatch, clean_sets):
    """The clean CIFAR-10 splits BackdoorBench only names, served without torchvision or a download."""
    seen = []

    def load_split(name, root, train, download=True):
        seen.append((name, root, train, download))
        s = clean_sets[0] if train else clean_sets[1]
        return ImageSet(s.x.clone(), s.y.clone(), 10)

    monkeypatch.setattr(ext, "load_split", load_split)
    return seen


@pytest.mark.parametrize("layout", ["in_ram", "on_disk", "in_ram_numpy1"])
def test_backdoorbench_attack_result_reads_into_our_forms(tmp_path, preact, clean_sets, fake_clean, layout):
    f, test_idx = write_attack_result(tmp_path / "badnet_0_1", clean_sets, preact, on_disk=layout == "on_disk",
                                      legacy_numpy1=layout == "in_ram_numpy1")
    run = read_backdoorbench(str(f), "/data")
    train, test = clean_sets
    assert fake_clean == [("cifar10", "/data", True, False), ("cifar10", "/data", False, False)]
    assert (run.arch, run.num_classes, run.input_size, run.dataset) == ("preactresnet18", 10, (3, 32, 32), "cifar10")
    assert run.mean == (0.4914, 0.4822, 0.4465) and run.std == (0.247, 0.243, 0.261)
    assert run.poison_indices.tolist() == POISON
    want_x, want_y = train.x.clone(), train.y.clone()
    want_x[POISON], want_y[POISON] = trigger(train.x[POISON]), TARGET
    assert torch.equal(run.train.x, want_x) and torch.equal(run.train.y, want_y)
    assert torch.equal(run.test.x, test.x) and torch.equal(run.test.y, test.y)
    assert run.test_bd_indices.tolist() == test_idx.tolist()
    assert torch.equal(run.test_bd.x, trigger(test.x[test_idx])) and (run.test_bd.y == TARGET).all()
    model = build_model(run.arch, run.num_classes, run.input_size[0], run.mean, run.std)
    model.load_state_dict(run.state_dict)
    for k, v in preact.state_dict().items():
        if k.startswith("net."):
            assert torch.equal(model.state_dict()[k], v), k
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(run.std))


def test_backdoorbench_layout_and_data_errors(tmp_path, preact, clean_sets, fake_clean):
    train, test = clean_sets
    f, _ = write_attack_result(tmp_path / "v1", clean_sets, preact, on_disk=False,
                               bd_train={"x": torch.zeros(4, 3, 32, 32), "y": torch.zeros(4), "original_index": None})
    one_line_error(read_backdoorbench, str(f), "/data", match="BackdoorBench v1 attack result")
    f, _ = write_attack_result(tmp_path / "vgg", clean_sets, preact, on_disk=False, model_name="vgg19_bn")
    one_line_error(read_backdoorbench, str(f), "/data", match="'vgg19_bn'; supported: preactresnet18, resnet18")
    f, _ = write_attack_result(tmp_path / "tiny", clean_sets, preact, on_disk=False, clean_data="tiny")
    one_line_error(read_backdoorbench, str(f), "/data", match="attacked on 'tiny'")
    torch.save({"model": foreign_preact(preact)}, tmp_path / "other.pt")
    one_line_error(read_backdoorbench, str(tmp_path / "other.pt"), "/data", match="found: model")
    # the clean data on disk is another copy: a poisoned sample's original label disagrees
    f, _ = write_attack_result(tmp_path / "ok", clean_sets, preact, on_disk=True)
    train.y[POISON[0]] += 1
    try:
        one_line_error(read_backdoorbench, str(f), "/data", match=f"sample {POISON[0]} has label")
    finally:
        train.y[POISON[0]] -= 1
    os.remove(tmp_path / "ok" / "bd_train_dataset" / str(int(train.y[5])) / "5.png")
    one_line_error(read_backdoorbench, str(f), "/data", match="bd_train_dataset/")


def test_backdoorbench_without_the_clean_dataset_is_a_clear_error(tmp_path, preact, clean_sets):
    f, _ = write_attack_result(tmp_path / "run", clean_sets, preact, on_disk=False)
    msg = one_line_error(read_backdoorbench, str(f), str(tmp_path / "no_data"), match="clean cifar10 set")
    assert str(tmp_path / "no_data") in msg
