"""How a run is named in the results table and in its figures' titles, from its summary.json and args.json.

Plain dicts in, text out, and nothing but the standard library, so ``python -m utils.report`` stays free of
torch. ``defense_label`` adds the settings that tell two runs of one defense apart: ``aft[window=5]`` (PGD
confined to a window, this toolkit's option) against ``aft`` (the paper's whole-image PGD), ``pud[target=3]``
or ``pbe[target=3]`` when the target class was given instead of estimated, ``pud[repair]`` in the
model-repair setting.
"""
from __future__ import annotations


def defense_label(summary: dict) -> str:
    """``none`` for an attack run, else the defense's name with its distinguishing settings in brackets."""
    name = summary.get("defense", "none")
    settings = summary.get("settings") or {}
    tags = []
    if name == "aft" and (settings.get("pgd") or {}).get("window"):
        tags.append(f"window={settings['pgd']['window']}")
    if name in ("pbe", "pud") and settings.get("target_label", "auto") != "auto":
        tags.append(f"target={settings['target_label']}")
    if name == "pud" and settings.get("model_repair"):
        tags.append("repair")
    return name + (f"[{','.join(tags)}]" if tags else "")


def attack_label(args: dict) -> str:
    """``blend all2one`` (trigger and label map), from the run's args.json; ``backdoorbench`` or ``other code``
    for a model and data this toolkit did not make."""
    attack = " ".join(str(args[k]) for k in ("trigger_type", "attack_mode") if args.get(k))
    if not attack and (args.get("from_backdoorbench") or args.get("train_data")):
        attack = "backdoorbench" if args.get("from_backdoorbench") else "other code"
    if attack and args.get("pc") == 0:  # train_blend.py --pc 0: a clean model that keeps the trigger
        attack += " (no poisoned image)"
    return attack


def run_title(run: str, args: dict, summary: dict) -> str:
    """A figure title: the run folder, the attack and data, the defense (if any)."""
    data = "/".join(str(args[k]) for k in ("dataset", "arch") if args.get(k))
    defense = defense_label(summary)
    what = f"{attack_label(args)} on {data}"
    if defense == "none" and args.get("pc") is not None:
        what += f", {100 * args['pc']:g} % poisoned"
    if defense != "none":
        what += f", defense {defense}"
    return f"{run}: {what}"
