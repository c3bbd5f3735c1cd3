"""Every bad input of the three entry scripts: exit 2, one ``error:`` line naming the problem, nothing written.

The table runs each script's ``main`` in this process through ``run_cli`` (the same path as the command
line, without an interpreter start-up per case); one case runs as a real subprocess.
"""
import os
import shutil

import pytest
import torch

import PUD
import pbe_main
import train_blend
from conftest import TINY_ATTACK, cli, run_script
from utils.run.checkpoint import load_checkpoint

MAINS = {"train_blend.py": train_blend.main, "pbe_main.py": pbe_main.main, "PUD.py": PUD.main}
# A case's arguments are added to the script's base arguments (later flags win); {name} is a prepared input.
# The fresh --out_dir {out} is appended unless the case gives its own --out_dir, or NO_OUT.
NO_OUT = "<no --out_dir>"
BASE = {"train_blend.py": (*TINY_ATTACK, "--n_iters", "1"), "pbe_main.py": ("--device", "cpu"), "PUD.py": ("--device", "cpu")}

A, P, U = "train_blend.py", "pbe_main.py", "PUD.py"
# a model and data of other code (the tiny attack exported as files); later flags win
EXT = ("--model_path", "{ext_w}", "--train_data", "{ext_train}", "--test_data", "{ext_test}", "--arch", "cnn",
       "--num_classes", "10")
CASES = [
    # train_blend.py: names and ranges
    (A, ("--dataset", "svhn"), "unknown dataset 'svhn'"),
    (A, ("--trigger_type", "laser"), "unknown trigger 'laser'"),
    (A, ("--arch", "vgg99"), "unknown arch 'vgg99'"),
    (A, ("--attack_mode", "some2some"), "unknown attack mode 'some2some'"),
    (A, ("--poison_mode", "sometimes"), "unknown --poison_mode 'sometimes'"),
    (A, ("--device", "tpu"), "unknown --device 'tpu'"),
    (A, ("--pc", "-0.1"), "--pc must be in [0, 1)"),
    (A, ("--pc", "1.5"), "--pc must be in [0, 1)"),
    (A, ("--pc", "abc"), "'abc' is not a number or a fraction"),
    (A, ("--target_label", "10"), "--target_label 10 is not a class of synthetic"),
    (A, ("--n_iters", "0"), "--n_iters must be a positive number of epochs"),
    (A, ("--n_iters", "two"), "invalid int value: 'two'"),
    (A, ("--lr_C=-0.1",), "--lr_C must be positive"),
    (A, ("--bs", "0"), "--bs must be positive"),
    (A, ("--schedulerC_milestones", "0"), "--schedulerC_milestones must be positive epochs"),
    (A, ("--schedulerC_lambda", "0"), "--schedulerC_lambda (the LR decay factor) must be in (0, 1]"),
    (A, ("--sig_delta", "2"), "--sig_delta is in pixel units"),
    (A, ("--patch_size", "11"), "--patch_size 11 makes a 33x33 patch"),
    (A, ("--trigger_type", "warp", "--k", "1"), "--k must be at least 2"),
    (A, ("--trigger_type", "warp", "--pc", "0.5", "--cross_ratio", "2"), "more than the whole training set"),
    (A, ("--trigger_type", "blend", "--blend_image", "/nonexistent/kitty.png"), "--blend_image '/nonexistent/kitty.png' does not exist"),
    (A, ("--trigger_type", "blend", "--blend_image", "{badimg}"), "cannot read --blend_image"),
    (A, ("--random_rotation", "200"), "--random_rotation must be in [0, 180]"),
    (A, ("--train_subset", "0"), "--train_subset must be a positive image count"),
    (A, ("--eval_eps", "2"), "--eval_eps must be in [0, 1]"),
    (A, ("--dataset", "cifar10", "--data_root", "{nodata}", "--download", "never"), "data folder '{nodata}' does not exist"),
    (A, ("--dataset", "cifar10", "--data_root", "{empty}", "--download", "never"),
     "cifar10 data not found under --data_root '{empty}', and --download never does not fetch it; copy the "
     "cifar-10-batches-py folder (as torchvision downloads it) into '{empty}', or leave out --download never"),
    (A, ("--threads", "0"), "--threads must be a positive number of CPU threads, got 0"),
    (A, ("--model_path", "x.pt"), "unrecognized arguments: --model_path x.pt"),
    (A, ("--colour", "red"), "unrecognized arguments: --colour red"),
    # train_blend.py: run folders and --resume
    (A, ("--out_dir", "{file}"), "is a file, not a folder"),
    (A, ("--out_dir", "{finished}"), "already holds a finished run (summary.json)"),
    (A, ("--out_dir", "{interrupted}"), "holds a run that was interrupted (state.pt); continue it with --resume"),
    (A, (NO_OUT, "--resume"), "--resume needs the --out_dir of the interrupted run"),
    (A, ("--resume", "--overwrite", "--out_dir", "{interrupted}"), "pass only one of them"),
    (A, ("--resume",), "--resume: '{out}' does not exist"),
    (A, ("--resume", "--out_dir", "{empty}"), "holds no saved state (state.pt), so there is nothing to resume"),
    (A, ("--resume", "--out_dir", "{finished}"), "the run in '{finished}' is finished"),
    (A, ("--resume", "--out_dir", "{torn_state}"), "state.pt' is unreadable or truncated"),
    (A, ("--resume", "--out_dir", "{old_state}"), "has format version 0, this toolkit reads versions 1 and 2"),
    (A, ("--n_iters", "3", "--resume", "--out_dir", "{interrupted}"), "arguments differ from the interrupted run"),
    # pbe_main.py
    (P, ("--out_dir", "{out}"), "no checkpoint given; pass --model_path"),
    (P, ("--model_path", "{nodata}/model.pt"), "does not exist"),
    (P, ("--model_path", "{finished}"), "--model_path '{finished}' is a folder; pass the checkpoint in it: "
                                        "--model_path {finished}/model.pt"),
    (U, ("--model_path", "{empty}"), "--model_path '{empty}' is a folder without a model.pt; pass --model_path "
                                     "<attack run folder>/model.pt"),
    (P, ("--model_path", "{foreign}"), "is not a checkpoint of this toolkit"),
    (P, ("--model_path", "{torn}"), "is unreadable or truncated"),
    (P, ("--model_path", "{v99}"), "has format version 99, this toolkit reads version 1"),
    (P, ("--model_path", "{ck}", "--dataset", "cifar10"), "is a synthetic/cnn model"),
    (P, ("--model_path", "{ck}", "--arch", "preactresnet18"), "is a synthetic/cnn model"),
    (P, ("--model_path", "{ck}", "--extra_ratio", "0"), "--extra_ratio must be in (0, 1]"),
    (P, ("--model_path", "{ck}", "--extra_ratio", "1.5"), "--extra_ratio must be in (0, 1]"),
    (P, ("--model_path", "{ck}", "--extra_ratio", "0.95"), "only 270 training images are unpoisoned; lower --extra_ratio"),
    (P, ("--model_path", "{ck}", "--aft_epochs", "2", "--adv_epochs", "3"), "--adv_epochs 3 must be between 0 and --aft_epochs 2"),
    (P, ("--model_path", "{ck}", "--adv_eps", "2"), "--adv_eps must be in [0, 1]"),
    (P, ("--model_path", "{ck}", "--adv_eps=-1/255"), "--adv_eps must be in [0, 1]"),
    (P, ("--model_path", "{ck}", "--adv_window", "33"), "--adv_window must be between 0 (whole image) and the image size"),
    (P, ("--model_path", "{ck}", "--adv_window=-1"), "--adv_window must be between 0 (whole image) and the image size"),
    (P, ("--model_path", "{ck}", "--adv_eps_outside", "6/255"), "--adv_eps_outside is the budget outside --adv_window"),
    (P, ("--model_path", "{ck}", "--adv_restarts", "0"), "--adv_restarts must be >= 1"),
    (P, ("--model_path", "{ck}", "--window_search", "4"), "--window_search places PGD windows: it needs --adv_window > 0"),
    (P, ("--model_path", "{ck}", "--window_search=-1"), "--window_search must be >= 0"),
    (P, ("--model_path", "{ck}", "--progressive", "--window_search", "4"), "--window_search is AFT's"),
    (P, ("--model_path", "{ck}", "--progressive", "--reverse_every", "9"), "--reverse_every is AFT's"),
    (P, ("--model_path", "{ck}", "--reverse_every=-1"), "--reverse_every must be >= 0"),
    (P, ("--model_path", "{ck}", "--reverse_every", "9", "--reverse_share", "0"), "--reverse_share must be in"),
    (P, ("--model_path", "{ck}", "--reverse_every", "9", "--reverse_steps", "0"), "--reverse_steps must be positive"),
    (P, ("--model_path", "{ck}", "--progressive", "--ascent_bs", "0"), "--ascent_bs must be positive"),
    (P, ("--model_path", "{ck}", "--adv_window", "5", "--adv_eps_outside", "8/255"), "--adv_eps_outside must be in (0, --adv_eps"),
    (P, ("--model_path", "{ck}", "--ft_lr", "0"), "--ft_lr must be positive"),
    (P, ("--model_path", "{ck}", "--clean_weight", "1"), "--clean_weight must be in [0, 1)"),
    (P, ("--model_path", "{ck}", "--eval_steps=-1"), "--eval_steps must be >= 0"),
    (P, ("--model_path", "{ck}", "--progressive", "--rounds", "3", "--top_rates", "0.5"), "--top_rates needs a keep-fraction"),
    (P, ("--model_path", "{ck}", "--progressive", "--detect_fraction", "1"), "--detect_fraction must be in (0, 1)"),
    (P, ("--model_path", "{ck}", "--progressive", "--later_lr", "0"), "--later_lr must be positive"),
    (P, ("--model_path", "{ck}", "--progressive", "--round_eps", "6/255", "2/255"), "--round_eps needs one radius per round"),
    (P, ("--model_path", "{ck}", "--progressive", "--rounds", "1", "--round_eps", "2"), "--round_eps must be >= 0"),
    (P, ("--model_path", "{ck}", "--progressive", "--init_pool", "clean"), "invalid choice: 'clean'"),
    (P, ("--model_path", "{ck}", "--progressive", "--target_label", "10"), "--target_label 10 is not a class"),
    (P, ("--model_path", "{ck}", "--progressive", "--target_images", "0"), "--target_images must be positive"),
    (P, ("--model_path", "{ck}", "--resume", "--out_dir", "{interrupted}"), "holds a train_blend.py run, not a pbe_main.py run"),
    # PUD.py
    (U, ("--model_path", "{batch}"), "PUD needs the training set's poisoned indices"),
    (U, ("--model_path", "{ck}", "--steps", "2", "--step_epochs", "1"), "--step_epochs needs one value per step"),
    (U, ("--model_path", "{ck}", "--top_rates", "0.2"), "--top_rates needs one value per step but the last"),
    (U, ("--model_path", "{ck}", "--target_label", "99"), "--target_label 99 is not a class"),
    (U, ("--model_path", "{ck}", "--target_label", "dog"), "'dog' is not 'auto' or a class index"),
    (U, ("--model_path", "{ck}", "--init_ratio", "0"), "--init_ratio must be in (0, 1]"),
    (U, ("--model_path", "{ck}", "--poison_fraction", "0"), "--poison_fraction must be in (0, 1]"),
    (U, ("--model_path", "{ck}", "--step_adv_epochs", "11", "2", "1", "1", "1"), "--step_adv_epochs 11 of step 0 must be between 0"),
    (U, ("--model_path", "{ck}", "--spectre_layer", "net.nope"), "--spectre_layer 'net.nope' is not a module of cnn"),
    (U, ("--model_path", "{ck}", "--ema_decay", "2"), "--ema_decay must be in [0, 1]"),
    (U, ("--model_path", "{ck}", "--pud_lr", "0"), "--pud_lr must be positive"),
    (U, ("--model_path", "{ck}", "--class_split_tie", "1"), "--class_split_tie must be in [0, 1)"),
    # a model and data of other code (--train_data), BackdoorBench (--from_backdoorbench)
    (U, ("--model_path", "{ck}", "--test_data", "{ext_test}"), "--test_data is for a model and data of other code: it needs --train_data"),
    (U, ("--model_path", "{ck}", "--allow_pickle"), "--allow_pickle is for a model and data of other code"),
    (U, ("--from_backdoorbench", "{bb_v1}", "--model_path", "{ck}"), "--from_backdoorbench reads the model and data from the attack result; drop --model_path"),
    (U, ("--model_path", "{ext_w}", "--train_data", "{ext_train}", "--arch", "cnn", "--num_classes", "10"), "--train_data needs a clean test set: pass --test_data"),
    (U, ("--train_data", "{ext_train}", "--test_data", "{ext_test}"), "--train_data needs the model it trained: pass --model_path"),
    (U, ("--model_path", "{ext_w}", "--train_data", "{ext_train}", "--test_data", "{ext_test}", "--num_classes", "10"), "a model of other code needs --arch"),
    (U, ("--model_path", "{ext_w}", "--train_data", "{ext_train}", "--test_data", "{ext_test}", "--arch", "cnn"), "a model of other code needs --num_classes"),
    (U, (*EXT, "--arch", "preactresnet18"), "the weights do not fit arch 'preactresnet18': keys"),
    (U, (*EXT, "--num_classes", "43"), "pass --num_classes 10"),
    (U, (*EXT, "--model_path", "{ext_w_nonorm}"), "the model's input normalisation is unknown: pass --mean and --std"),
    (U, (*EXT, "--mean", "0.5", "0.5", "0.5"), "pass --mean and --std together"),
    (U, (*EXT, "--mean", "0", "0", "0", "--std", "1", "1", "1"), "the weights carry their own normalisation"),
    (U, (*EXT, "--model_path", "{ext_w_nonorm}", "--mean", "0", "--std", "1"), "--mean/--std give 1 value(s) but the images have 3 channel(s)"),
    (U, (*EXT, "--std", "0", "1", "1"), "'0' is not a positive number"),
    (U, (*EXT, "--model_path", "{ext_module}"), "holds pickled Python objects (models.normalize.NormalizedModel)"),
    (U, (*EXT, "--model_path", "{ext_module}"), "if you trust the file, pass --allow_pickle"),
    (U, (*EXT, "--train_data", "{ext_gray}"), "the training images have 1 channel(s) but the model's first layer (net.features.0.0.weight) takes 3"),
    (U, (*EXT, "--test_data", "{ext_small}"), "holds 3x16x16 images (C x H x W), the model's are 3x32x32"),
    (U, (*EXT, "--test_bd_data", "{ext_small}"), "--test_bd_data '{ext_small}' holds 3x16x16 images"),
    (U, (*EXT, "--dataset", "mnist"), "--train_data holds 3x32x32 images, mnist's are 1x28x28"),
    (U, (*EXT, "--train_data", "{ext_badlabel}"), "labels span [0, 12], outside [0, 10)"),
    (U, (*EXT, "--train_data", "{ext_wrongkeys}"), "lacks 'x' and 'y' (keys found: images, labels)"),
    (U, (*EXT, "--train_data", "{ext_floaty}"), "y must be a vector of integer labels, got torch.float32"),
    (U, (*EXT, "--train_data", "{ext_emptydir}"), "has no class folders; expected root/<class>/<image>"),
    (U, (*EXT, "--train_data", "{nodata}"), "does not exist; give an image folder"),
    (U, (*EXT, "--poison_indices", "{ext_badidx}"), "indices span [0, 300], outside the training set's [0, 300)"),
    (U, (*EXT, "--model_repair"), "--model_repair draws step 0's extra set from the clean training samples"),
    (U, ("--model_path", "{ext_defended}"), "is a model defended on data of other code"),
    (U, ("--from_backdoorbench", "{bb_v1}"), "is a BackdoorBench v1 attack result"),
    (U, ("--from_backdoorbench", "{bb_vgg}"), "holds a BackdoorBench 'vgg19_bn'; supported: preactresnet18, resnet18"),
    (U, ("--from_backdoorbench", "{ext_train}"), "is not a BackdoorBench attack_result.pt"),
    (P, EXT, "AFT needs a clean extra set, and which training samples are clean is unknown"),
    (P, (*EXT, "--progressive", "--extra_data", "{ext_test}"), "--extra_data is AFT's clean set; progressive PBE"),
    (P, (*EXT, "--extra_data", "{ext_small}"), "--extra_data '{ext_small}' holds 3x16x16 images"),
    (P, (*EXT, "--extra_data", "{ext_emptydir}"), "has no class folders"),
]


@pytest.fixture(scope="module")
def inputs(tiny_attack_run, tmp_path_factory):
    """Prepared files and folders the cases point at (a finished and an interrupted run, broken checkpoints, ...)."""
    root = tmp_path_factory.mktemp("inputs")
    ck = str(tiny_attack_run / "model.pt")
    p = {"ck": ck, "nodata": str(root / "nodata"), "file": str(root / "a_file")}
    (root / "a_file").write_text("not a folder")
    (root / "kitty.png").write_text("this is not an image")
    p["badimg"] = str(root / "kitty.png")
    p["torn"] = str(root / "torn.pt")
    data = open(ck, "rb").read()
    open(p["torn"], "wb").write(data[:len(data) // 2])
    p["foreign"] = str(root / "state_dict.pt")
    torch.save({"conv.weight": torch.zeros(1)}, p["foreign"])
    c = load_checkpoint(ck)
    p["v99"] = str(root / "v99.pt")
    torch.save(dict(c, version=99), p["v99"])
    batch_run = root / "batch_run"
    assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "1", "--poison_mode", "batch", "--out_dir", batch_run) == 0
    p["batch"] = str(batch_run / "model.pt")
    p["finished"] = str(shutil.copytree(tiny_attack_run, root / "finished"))
    p["empty"] = str(root / "empty")
    os.makedirs(p["empty"])
    p["interrupted"] = str(root / "interrupted")
    os.environ["PUD_INJECT_SIGTERM_AT"] = "2:0"
    try:
        assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "2", "--out_dir", p["interrupted"]) == 143
    finally:
        del os.environ["PUD_INJECT_SIGTERM_AT"]
    p["torn_state"] = str(shutil.copytree(p["interrupted"], root / "torn_state"))
    state = os.path.join(p["torn_state"], "state.pt")
    data = open(state, "rb").read()
    open(state, "wb").write(data[:len(data) // 3])
    p["old_state"] = str(shutil.copytree(p["interrupted"], root / "old_state"))
    state = os.path.join(p["old_state"], "state.pt")
    torch.save(dict(torch.load(state, weights_only=True), version=0), state)
    p.update(external_inputs(c, root))
    return p


def external_inputs(c: dict, root) -> dict:
    """The tiny attack's model and data as files of other code, and broken variants of them."""
    from models import build_model
    from test_external import write_attack_result
    from utils.data.datasets import ImageSet

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (300,), generator=g)
    files = {
        "ext_w": c["state_dict"],
        "ext_w_nonorm": {k: v for k, v in c["state_dict"].items() if not k.startswith("normalize.")},
        "ext_train": {"x": x, "y": y},
        "ext_test": {"x": x[:40], "y": y[:40]},
        "ext_gray": {"x": x[:, :1], "y": y},
        "ext_small": {"x": x[:20, :, :16, :16], "y": y[:20]},
        "ext_badlabel": {"x": x, "y": torch.where(torch.arange(300) == 7, 12, y)},
        "ext_wrongkeys": {"images": x, "labels": y},
        "ext_floaty": {"x": x, "y": y.float()},
        "ext_badidx": torch.tensor([0, 300]),
        "ext_defended": dict(c, trigger=None, attack_mode=None, target_label=None, poison_mode="given"),
    }
    p = {}
    for name, obj in files.items():
        p[name] = str(root / f"{name}.pt")
        torch.save(obj, p[name])
    model = build_model("cnn", 10)
    model.load_state_dict(c["state_dict"])
    p["ext_module"] = str(root / "module.pt")
    torch.save(model, p["ext_module"])  # a whole pickled nn.Module
    p["ext_emptydir"] = str(root / "emptydir")
    os.makedirs(p["ext_emptydir"])
    clean = (ImageSet(x[:24], y[:24], 10), ImageSet(x[:12], torch.arange(12) % 10, 10))
    preact = build_model("preactresnet18", 10)
    p["bb_v1"] = str(write_attack_result(root / "bb_v1", clean, preact, on_disk=False, bd_train={
        "x": torch.zeros(4, 3, 32, 32), "y": torch.zeros(4), "original_index": None})[0])
    p["bb_vgg"] = str(write_attack_result(root / "bb_vgg", clean, preact, on_disk=False, model_name="vgg19_bn")[0])
    return p


def snapshot(path):
    """Every file under ``path`` with its size and modification time (None if ``path`` does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.stat(path).st_mtime_ns
    return {os.path.relpath(os.path.join(d, f), path): (os.stat(os.path.join(d, f)).st_size,
                                                         os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("script, extra, fragment", CASES, ids=[f"{s}:{' '.join(e)}" for s, e, _ in CASES])
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(inputs, tmp_path, monkeypatch, capsys,
                                                                  script, extra, fragment):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a default run folder would appear here
    names = dict(inputs, out=str(tmp_path / "out"))
    argv = [a.format(**names) for a in extra if a != NO_OUT]
    if NO_OUT not in extra and "--out_dir" not in extra:
        argv += ["--out_dir", names["out"]]
    watched = [names["out"]] + [v for v in inputs.values() if os.path.exists(v)]
    before = {w: snapshot(w) for w in watched}

    code = cli(MAINS[script], *BASE[script], *argv)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment.format(**names) in err[0]
    assert {w: snapshot(w) for w in watched} == before, "a failed run must not write anything"
    assert os.listdir(cwd) == []


def test_the_table_is_long_enough_and_covers_every_script():
    assert len(CASES) >= 30 and {s for s, _, _ in CASES} == set(MAINS)


@pytest.mark.slow
def test_bad_input_on_the_command_line(tmp_path):
    out = tmp_path / "out"
    r = run_script("train_blend.py", "--dataset", "svhn", "--out_dir", str(out))
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown dataset 'svhn'; choose one of synthetic, synthetic43, cifar10, " \
                                                     "gtsrb, mnist, fashionmnist, imagenet"
    assert not out.exists()


def test_every_scripts_help_renders():
    """argparse %-formats each help string when --help is printed: a bare percent sign in a setting's help (it
    needs %%) breaks only --help, which nothing else runs."""
    import config

    for script in ("attack", "pbe", "pud"):
        text = config.build_parser(script).format_help()
        assert "--out_dir" in text and "--seed" in text
