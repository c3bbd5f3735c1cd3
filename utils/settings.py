"""Typed, frozen settings: each algorithm declares its parameters once, next to its code.

A settings class is a frozen dataclass whose fields are declared with ``opt`` (a command-line flag with
its default, help line and type) or ``derived`` (no flag: resolved once from the dataset or the
checkpoint before the run starts). ``check`` validates an instance without changing it and raises
``UserError`` naming the flag and the fix. A ``Job`` bundles the settings one script uses; ``config.py``
turns a job's parts into that script's argparse groups (one group per part, in order) and parses the
command line into a job. ``Job.flat()`` is the one flat record of a run's settings (``args.json``, the
checkpoint's ``args``, the comparison ``--resume`` makes).
"""
from __future__ import annotations

import argparse
import dataclasses
import operator
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, ClassVar, get_type_hints

from utils.run.errors import UserError


def fraction(text: str) -> float:
    """A float that may be written as a fraction: ``6/255`` or ``0.0235``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or a fraction like 8/255") from None


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def checked_int(name: str, v, lo: int = 1) -> int:
    """``v`` as a plain int >= ``lo``, for library arguments (not flags): ValueError naming ``name`` otherwise.

    Accepts anything with ``__index__`` (numpy and 0-d torch integers), refuses bools, floats and strings.
    """
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if isinstance(v, bool) or i < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return i


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def opt(default: Any, help: str, *, type=None, nargs=None, choices=None, action=None, shown: str | None = None,
        metavar: str | None = None, aliases: tuple = ()) -> Any:
    """A field with a flag ``--<name>``; ``shown`` overrides how the default reads in ``--help``."""
    if metavar is None and choices is None and action is None:
        metavar = {int: "N", float: "X", fraction: "X"}.get(type, "NAME")
    md = {"cli": True, "help": help, "type": type, "nargs": nargs, "choices": choices, "action": action,
          "shown": shown, "metavar": metavar, "aliases": tuple(aliases)}
    return field(default=_frozen(default), metadata=md)


def derived(default: Any = None) -> Any:
    """A field without a flag, resolved before the run (e.g. the class count of the dataset)."""
    return field(default=default, metadata={"cli": False})


def show(value) -> str:
    """A default as a user would write it: ``6/255`` rather than ``0.023529411764705882``, lists space-separated."""
    if isinstance(value, (tuple, list)):
        return " ".join(show(v) for v in value) if value else "none"
    if isinstance(value, float):
        text = repr(value)
        if len(text) > 8:  # a long decimal: a fraction of 255 (pixel units) if it is one
            for digits in (0, 1):
                n = round(value * 255, digits)
                if abs(n / 255 - value) < 1e-12:
                    return f"{n:g}/255"
        return f"{value:g}" if len(text) > 8 else text
    return str(value)


@dataclass(frozen=True)
class Settings:
    """Base of every settings class: ``GROUP`` titles its ``--help`` group."""

    GROUP: ClassVar[str] = ""

    def check(self) -> None:
        """Validate without changing anything; ``UserError`` on a bad value."""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def cli_fields(cls) -> list:
        return [f for f in fields(cls) if f.metadata.get("cli")]

    @classmethod
    def from_record(cls, record: dict):
        """An instance from a flat saved record (a checkpoint's ``args``): known keys, the rest at defaults."""
        return cls(**{f.name: _frozen(record[f.name]) for f in fields(cls) if f.name in record})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(cls.GROUP)
        for f in cls.cli_fields():
            md = f.metadata
            help_text = md["help"]
            if md["action"] is None and (md["shown"] is not None or f.default is not None):
                help_text += f" (default: {md['shown'] if md['shown'] is not None else show(f.default)})"
            kw = {"dest": f.name, "default": f.default, "help": help_text}
            if md["action"] is not None:
                kw["action"] = md["action"]
            else:
                kw.update({k: md[k] for k in ("type", "nargs", "choices", "metavar") if md[k] is not None})
            group.add_argument(f"--{f.name}", *md["aliases"], **kw)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        return cls(**{f.name: _frozen(getattr(ns, f.name)) for f in cls.cli_fields()})


@dataclass(frozen=True, kw_only=True)
class Job:
    """The settings one script runs with: each field a ``Settings`` part (an argparse group), plus the command.

    Concrete jobs are ``@dataclass(frozen=True, kw_only=True)`` subclasses listing their parts in ``--help`` order;
    a job's docstring is its script's ``--help`` description.
    """

    KEY: ClassVar[str] = ""  # attack, pbe or pud: the run state's script and the default run folder's prefix
    command: tuple = ()

    @classmethod
    def part_types(cls) -> list:
        hints = get_type_hints(cls)
        return [(f.name, hints[f.name]) for f in fields(cls) if f.name != "command"]

    def parts(self) -> list:
        return [(name, getattr(self, name)) for name, _ in self.part_types()]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict:
        """Every setting of every part under its own name (names are unique within a job), and the command."""
        out: dict = {}
        for name, part in self.parts():
            for key, value in part.as_dict().items():
                if key in out:
                    raise ValueError(f"setting {key!r} of part {name!r} is defined twice in {type(self).__name__}")
                out[key] = list(value) if isinstance(value, tuple) else value
        out["command"] = list(self.command)
        return out

    def resolve(self) -> "Job":
        """The job with the defaults that follow from other settings filled in (before ``check``)."""
        return self

    def check(self) -> None:
        for _, part in self.parts():
            part.check()
