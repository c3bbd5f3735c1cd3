"""The one command-line builder every entry script shares: argparse groups made from the typed settings.

Each script runs one ``Job`` (``utils.attack.AttackJob``, ``utils.defenses.pbe.PBEJob``,
``utils.defenses.pud.PUDJob``); its parts are settings classes declared next to the code that uses them,
and each part becomes one argparse group, so a flag is defined once, with its help and default.
``parse_args(script, argv)`` parses, resolves the per-dataset defaults of an attack, and validates every
value before any work is done, raising ``UserError`` with a one-line fix (a defense's checks that need its
checkpoint run when the checkpoint is read, still before any output). Bad usage never prints a traceback.
"""
from __future__ import annotations

import argparse
import inspect
import sys

from utils.run.errors import OneLineParser
from utils.run.resume import SCRIPT_FILES
from utils.run.runlog import default_out_dir
from utils.settings import Job


def job_class(script: str) -> type[Job]:
    """The script's job; imported here so that a script imports only its own algorithm to parse its arguments."""
    if script == "attack":
        from utils.attack import AttackJob
        return AttackJob
    if script == "pbe":
        from utils.defenses.pbe import PBEJob
        return PBEJob
    if script == "pud":
        from utils.defenses.pud import PUDJob
        return PUDJob
    raise ValueError(f"unknown script {script!r}; one of attack, pbe, pud")


def build_parser(script: str) -> argparse.ArgumentParser:
    job = job_class(script)
    parser = OneLineParser(prog=SCRIPT_FILES[script], usage="%(prog)s [options]",
                           description=" ".join(inspect.cleandoc(job.__doc__).split()))
    for _, part in job.part_types():
        part.add_arguments(parser)
    return parser


def parse_args(script: str, argv: list[str] | None = None, resolve: bool = True) -> Job:
    """Parse, resolve the defaults that follow from the dataset and validate; raises ``UserError`` on bad input.
    ``resolve=False``: the settings as the command line gives them, unchecked (to compare command lines without
    reading the data)."""
    job_cls = job_class(script)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser(script).parse_args(argv)
    parts = {name: part.from_namespace(ns) for name, part in job_cls.part_types()}
    job = job_cls(command=(SCRIPT_FILES[script], *argv), **parts)
    if not resolve:
        return job
    job = job.resolve()
    job.check()
    if job.run.out_dir is None and script == "attack":
        out = default_out_dir(script, job.data.dataset, job.trigger.trigger_type, job.attack.attack_mode)
        job = job.replace(run=job.run.replace(out_dir=out))
    return job
