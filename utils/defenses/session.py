"""A defense run's set-up, evaluation, outputs and resumable state (AFT, PBE and PUD all use one ``DefenseSession``).

The session reads the infected model and its data once (a toolkit checkpoint, files of other code or a
BackdoorBench result: ``utils.defenses.infected``), resolves the job's source-derived settings and checks
them (all before any output), takes the run folder, and builds the infected run. A defense keeps its
loop cursor and loop-carried values in one typed state object, starts with ``state = s.start(state,
**objects)`` (a fresh run evaluates the infected model and saves the first state; a resumed run gets the
saved state back) and calls ``s.save(position, state, **objects)`` at its epoch and stage boundaries. The
work runs inside ``with s.ctl:`` (signals, failure record). ``finish`` writes model.pt, summary.json, the
curves and, for a defense that flags samples, ``suspects.csv``.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields

import torch

from models.speed import SpeedSettings, amp_choice
from utils.adversarial import RobustEvalSettings, robust_eval
from utils.autoattack import final_robustness
from utils.data.build import DataSource
from utils.defenses.infected import DefenseInput, InfectedRun, InfectedSource, load_infected, read_infected
from utils.defenses.selection import consistency_scores, detection_stats, suspect_scores
from utils.evaluation import all_logits, evaluate, log_line
from utils.figures import write_figures
from utils.run import distributed as dist
from utils.run.checkpoint import checkpoint_payload, save_checkpoint
from utils.run.resume import RunControl, prepare_out_dir
from utils.run.runlog import RunDir, default_out_dir
from utils.run.runtime import RunSettings, pick_device, seed_everything
from utils.run.stagetimer import stage, stage_line
from utils.settings import Job, Settings, opt, require

SCRIPT_OF = {"aft": "pbe", "pbe": "pbe", "pud": "pud"}
SUMMARY_KEYS = ("clean_acc", "target_class_acc", "asr", "asr_incl_target", "robust_acc", "autoattack_acc", "noise_acc",
                "per_class_acc")
META_KEYS = ("arch", "arch_kwargs", "dataset", "num_classes", "input_size", "seed")
SUSPECTS_FILE = "suspects.csv"
SUSPECTS_COLUMNS = ("rank", "index", "path", "label", "score", "stages")


def late_epochs(total: int) -> int:
    """How many epochs make the last quarter of ``total`` (at least one)."""
    return max(1, -(-total // 4))


def late_asr(history: list[dict]) -> dict:
    """ASR's maximum over the last quarter of the epochs (at least one): a defense whose last epochs re-learn the
    backdoor has not removed it, whatever its final figure. The evaluation schedule (``EvalSchedule``) evaluates
    every one of those epochs."""
    epochs = [rec["epoch"] for rec in history if "epoch" in rec]
    if not epochs:
        return {}
    first = max(epochs) - late_epochs(max(epochs)) + 1
    late = [rec["asr"] for rec in history if "asr" in rec and rec.get("epoch", 0) >= first]
    if not late:
        return {}
    return {"asr_late_max": max(late), "asr_late_epochs": len(late)}


@dataclass(frozen=True)
class EvalSchedule(Settings):
    GROUP = "evaluation during the defense"
    eval_every: int = opt(5, "clean accuracy and ASR after every this many epochs, and always after each epoch of the "
                             "last quarter (the late ASR maximum), the last epoch of every stage and the run's end "
                             "(1: after every epoch); it does not change the training", type=int)

    def check(self) -> None:
        require(self.eval_every > 0, f"--eval_every must be positive, got {self.eval_every}")

    def due(self, epoch: int, total: int, stage_end: bool = False) -> bool:
        """Whether epoch ``epoch`` (1-based, of ``total``) is evaluated."""
        return stage_end or epoch % self.eval_every == 0 or epoch > total - late_epochs(total)


def state_record(state) -> dict:
    """A typed loop state as the plain dict ``state.pt`` stores."""
    return {f.name: getattr(state, f.name) for f in fields(state)}


class DefenseSession:
    """Set-up, evaluation, outputs and resumable state shared by the defense scripts (AFT, PBE, PUD)."""

    def __init__(self, job, name: str):
        src = read_infected(job.infected, job.source)  # the one read of the model and data files
        self.job = job = job.for_input(src)  # source-derived settings, checked before any output
        self.name = name
        job.run.apply_threads()
        self.device = dist.init(pick_device(job.run.device))  # torchrun: join the group, this rank's device
        loaded = prepare_out_dir(SCRIPT_OF[name], job)
        self.gen = seed_everything(job.run.seed)
        self.inf: InfectedRun = load_infected(src, job.source, job.speed, self.device, job.extra_data())
        job.check_model(self.inf.model)
        self.train_model = dist.wrap(self.inf.model, self.device)  # DDP under torchrun, else the model itself
        self.cl = job.speed.use_channels_last
        self.amp = amp_choice(job.speed.amp, self.device)  # the --amp decision, made once and recorded
        self.run = RunDir(job.run.out_dir)
        self.ctl = RunControl(SCRIPT_OF[name], job, self.run, self.gen, loaded)
        self.history: list[dict] = []
        self.initial: dict = {}
        self._logits: dict = {}  # id(model) -> (weights' versions, training-set logits)

    def start(self, state, **objects):
        """Fresh run: write args.json, evaluate the infected model, save the first state. Resumed: restore."""
        if self.ctl.resuming:
            saved = self.ctl.restore(**objects)
            self.initial, self.history = saved["initial"], saved["history"]
            return type(state)(**saved["loop"])
        self.run.start(dict(self.job.flat(), defense=self.name, device_used=str(self.device),
                            amp_used=self.amp))
        print(f"{self.name}: {self.inf.describe()} on {self.device}; writing to {self.job.run.out_dir}", flush=True)
        for what, why in self.inf.not_measurable().items():
            print(f"note: {'ASR' if what == 'asr' else 'poison detection'} is not measurable: {why}", flush=True)
        self.initial = self.evaluate(robust=True, earlier=(self.inf.ck or {}).get("metrics"), per_class=True)
        print(log_line("initial", self.initial), flush=True)
        self.save("the initial evaluation", state, **objects)
        return state

    def save(self, position: str, state, **objects) -> None:
        self.ctl.save(position, {"loop": state_record(state), "initial": self.initial, "history": self.history},
                      **objects)

    def epoch_eval(self, epoch: int, total: int, stage_end: bool = False, robust: bool = False) -> dict:
        """``evaluate`` after training epoch ``epoch`` of ``total`` if the schedule (``--eval_every``) has it (always
        with ``robust``), else nothing. Evaluations draw no random numbers, so the schedule leaves the training as
        it is."""
        if robust or self.job.schedule.due(epoch, total, stage_end):
            return self.evaluate(robust=robust)
        return {}

    def evaluate(self, robust: bool = False, final: bool = False, earlier: dict | None = None,
                 per_class: bool = False) -> dict:
        """Clean accuracy and ASR; with ``robust`` the PGD robust accuracy (taken from ``earlier``, e.g. the attack
        run's final metrics, when that evaluation had the same key); ``final`` adds AutoAttack if asked;
        ``per_class`` each class's accuracy (the summary's initial and final, not every epoch's)."""
        m, run, amp = self.inf.model, self.job.run, self.amp["amp"]
        with stage("eval_clean"):
            out = evaluate(m, self.inf.test, self.inf.backdoor, run.eval_bs, noise_seed=run.seed, channels_last=self.cl,
                           triggered=self.inf.test_bd,
                           num_classes=self.inf.num_classes if per_class else None)
        with stage("eval_robust"):
            if final:
                out.update(final_robustness(m, self.inf.test, self.job.robust, run.seed, run.eval_bs, self.cl, amp))
            elif robust:
                out.update(robust_eval(m, self.inf.test, self.job.robust, run.seed, run.eval_bs, self.cl, amp, earlier))
        return out

    def logits(self, model):
        """``all_logits`` of ``model`` on the training set, computed once per state of its weights: the infected
        reference is scored once per run, and a model scored again without a step in between is not recomputed.
        The key is the version counter of every parameter and buffer, which any in-place change (an optimizer
        step, BatchNorm statistics, ``load_state_dict``) advances."""
        key = tuple(t._version for t in model.state_dict(keep_vars=True).values())
        hit = self._logits.get(id(model))
        if hit is None or hit[0] != key:
            with stage("scoring"):
                hit = (key, all_logits(model, self.inf.poisoned, self.job.run.eval_bs, self.cl))
            self._logits[id(model)] = hit
        return hit[1]

    def log(self, rec: dict, prefix: str) -> None:
        rec["seconds"] = self.ctl.elapsed()
        self.history.append(rec)
        with stage("saving"):
            self.run.log(rec)
        print(log_line(prefix, rec), flush=True)

    def checkpoint_meta(self) -> dict:
        """The infected model's and data's fields; a toolkit checkpoint's ``args`` with the data read from where this
        run read it."""
        inf = self.inf
        if inf.origin != "toolkit":
            return {**{k: inf.meta[k] for k in META_KEYS}, "args": {}}
        where = {k: getattr(inf.data, k) for k in ("data_root", "download", "num_workers", "test_subset")}
        return {**{k: inf.meta[k] for k in META_KEYS}, "args": {**inf.meta["args"], **where}}

    def write_suspects(self, stages: dict) -> dict:
        """``suspects.csv``: every training sample a stage flagged (``stages``: name -> indices), most suspicious
        first (``suspect_scores``: the stages that agree, then how far the defense moved the model's view of the
        sample); returns the summary's record of it."""
        inf = self.inf
        with stage("scoring"):
            consistency = consistency_scores(self.logits(inf.reference), self.logits(inf.model), argmax_penalty=True)
        order, scores, members = suspect_scores(stages, consistency)
        labels = inf.poisoned.train_labels.cpu().tolist()
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(SUSPECTS_COLUMNS)
        for rank, (i, score) in enumerate(zip(order.tolist(), scores.tolist()), 1):
            w.writerow([rank, i, inf.paths[i] if inf.paths else "", labels[i], f"{score:.6f}",
                        ";".join(name for name, m in members.items() if i in m)])
        self.run.write_text(SUSPECTS_FILE, out.getvalue())
        det = detection_stats(order, inf.truth)
        return {"file": SUSPECTS_FILE, "count": len(order), "stages": {k: len(v) for k, v in members.items()},
                "precision": det["precision"], "recall": det["recall"]}

    def finish(self, settings: dict, extra_summary: dict | None = None, suspects: dict | None = None) -> dict:
        """Final evaluation (AutoAttack too if asked), model.pt, the figures (``utils.figures``), summary.json and,
        with ``suspects`` (stage name -> flagged training indices), suspects.csv."""
        final = self.evaluate(final=True, per_class=True)
        inf = self.inf
        summary = {"defense": self.name, "initial": {k: self.initial[k] for k in SUMMARY_KEYS if k in self.initial},
                   "final": {k: final[k] for k in SUMMARY_KEYS if k in final}, "robust_eval": final.get("robust_eval"),
                   "initial_robust_eval": self.initial.get("robust_eval"),
                   **({"autoattack_eval": final["autoattack_eval"]} if "autoattack_eval" in final else {}),
                   "settings": settings, "amp": self.amp, "torch_threads": torch.get_num_threads(),
                   **late_asr(self.history),
                   "target_class": inf.true_target,  # the class target_class_acc is of (all2one; else None)
                   "input": {"origin": inf.origin, "files": inf.files}, "not_measurable": inf.not_measurable(),
                   **(extra_summary or {})}
        if suspects is not None:
            summary["suspects"] = self.write_suspects(suspects)
        with stage("saving"):
            self._save_model(settings, summary)
        if self.job.run.figures:
            with stage("figures"):
                write_figures(self.job.run.out_dir, self.run.records(), summary, self.job.flat(), inf.test,
                              inf.backdoor, {"infected": inf.reference, "repaired": inf.model}, self.cl)
        summary["stages"] = self.ctl.stages()
        summary["seconds"] = summary["stages"]["wall"]
        self.run.write_json("summary.json", summary)
        self.ctl.finish()
        print(log_line(f"final ({summary['seconds']:.0f}s)", summary["final"]) + f" | {self.job.run.out_dir}",
              flush=True)
        print(stage_line(summary["stages"]), flush=True)
        return summary

    def _save_model(self, settings: dict, summary: dict) -> None:
        """model.pt: the repaired model with the infected run's data and the defense's record."""
        inf = self.inf
        defense = {"name": self.name, "settings": settings, "history": self.history,
                   "source": inf.files.get("model") or inf.files.get("backdoorbench")}
        extra = {"defense": defense} if inf.origin == "toolkit" else {"defense": defense, "external": inf.files}
        payload = checkpoint_payload(self.checkpoint_meta(), inf.model, inf.backdoor, inf.poisoned,
                                     inf.train_indices, summary["final"], extra)
        save_checkpoint(self.run.file("model.pt"), payload)


@dataclass(frozen=True, kw_only=True)
class DefenseJob(Job):
    """The parts every defense script has; a defense adds its own and the checks that need the checkpoint."""

    infected: DefenseInput
    run: RunSettings
    source: DataSource
    speed: SpeedSettings
    robust: RobustEvalSettings
    schedule: EvalSchedule

    def for_input(self, src: InfectedSource) -> "DefenseJob":
        """The job with the source's dataset, arch, classes and input shape, checked against them (and the
        default run folder, named after the attack)."""
        job = self.replace(infected=self.infected.resolve(src))
        job.check_for_input(src)
        if job.run.out_dir is None:
            inp = job.infected
            out = default_out_dir(self.KEY, inp.dataset or src.origin, inp.trigger_type, inp.attack_mode)
            job = job.replace(run=job.run.replace(out_dir=out))
        return job

    def check_for_input(self, src: InfectedSource) -> None:
        """Checks that need the source's classes, image size or ground truth (a defense adds its own)."""

    def extra_data(self) -> str | None:
        """A clean extra set the defender holds (AFT's ``--extra_data``); None for the others."""
        return None

    def check_model(self, model) -> None:
        """Checks that need the loaded model (e.g. a layer name)."""
