"""Seconds per stage of a run, so that a run says where its wall time went (summary.json ``stages``).

A ``StageTimer`` accumulates seconds per stage name; ``with stage("scoring"):`` charges the block to that
name. Nested stages are attributed once: the innermost open stage gets the time, its parents are paused
meanwhile (PGD inside a training epoch counts as ``train_pgd``, not also as ``train``), so the stages add up
to at most the wall time and the rest is ``unattributed``. One timer is active per process (``activate``);
without one, ``stage`` does nothing, so the algorithms time themselves without knowing whether anyone
listens. The seconds are plain floats: a run saves them in its state and a resumed run continues them.

On CUDA the boundaries are not synchronised (a sync per batch would cost more than it tells), so the
split between stages inside an epoch is approximate there; the totals stay right at host syncs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

# every stage the toolkit times, in run order (the report's column order)
STAGE_ORDER = ("setup", "target_estimate", "window_search", "trigger_reversal", "filtering", "train", "train_pgd",
               "scoring", "eval_clean", "eval_robust", "unlearning", "mean_teacher", "saving", "figures")
# stages whose seconds are training epochs (``training_share``); the rest is the defense's overhead
TRAINING_STAGES = ("train", "train_pgd", "unlearning", "mean_teacher")


class StageTimer:
    """Seconds per stage name, the innermost open stage charged (see the module doc)."""

    def __init__(self, seconds: dict | None = None, clock=time.perf_counter):
        self.seconds: dict[str, float] = {k: float(v) for k, v in (seconds or {}).items()}
        self.clock = clock
        self._open: list[str] = []
        self._mark = 0.0

    def _charge(self) -> None:
        now = self.clock()
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def stage(self, name: str):
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def record(self, wall: float) -> dict:
        """summary.json's record: seconds per stage, what no stage claimed, and the training share of ``wall``."""
        self._charge()
        stages = {k: round(v, 3) for k, v in sorted(self.seconds.items())}
        training = sum(self.seconds.get(k, 0.0) for k in TRAINING_STAGES)
        return {"seconds": stages, "wall": round(wall, 3),
                "unattributed": round(wall - sum(self.seconds.values()), 3),
                "training_share": round(training / wall, 4) if wall > 0 else None}


_ACTIVE: StageTimer | None = None


def activate(timer: StageTimer | None) -> StageTimer | None:
    """Make ``timer`` the process's timer (None: none); returns the previous one."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, timer
    return prev


def stage(name: str):
    """Charge the block to ``name`` on the active timer; a no-op without one."""
    return _ACTIVE.stage(name) if _ACTIVE is not None else nullcontext()


def stage_line(record: dict, top: int = 6) -> str:
    """One log line: the largest stages' seconds and the training share."""
    parts = sorted(record["seconds"].items(), key=lambda kv: -kv[1])[:top]
    share = record.get("training_share")
    return ("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in parts)
            + f"; unattributed {record['unattributed']:.1f}s of {record['wall']:.1f}s"
            + (f"; training share {share:.2f}" if share is not None else ""))
