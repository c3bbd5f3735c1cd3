"""A defense run's shared set-up, evaluation, outputs and resumable state (AFT, PBE and PUD all use one ``DefenseSession``).

Each defense keeps its loop cursor and loop-carried values in one ``carry`` dict, starts with
``carry = s.start(carry, **objects)`` (a fresh run evaluates the infected model and saves the first
state; a resumed run gets the saved carry back) and calls ``s.save(position, carry, **objects)`` at
its epoch and stage boundaries. The work runs inside ``with s.ctl:`` (signals, failure record).
"""
from __future__ import annotations

from utils.run import distributed as dist
from utils.attack import checkpoint_payload, log_line
from utils.run.checkpoint import save_checkpoint
from utils.defenses.common import InfectedRun, load_infected
from utils.evaluation import evaluate
from utils.run.plots import plot_curves
from utils.run.resume import RunControl, prepare_out_dir
from utils.robust import robust_acc_from_args
from utils.run.runlog import RunDir
from utils.run.runtime import pick_device, seed_everything

SCRIPT_OF = {"aft": "pbe", "pbe": "pbe", "pud": "pud"}


class DefenseSession:
    """Set-up, evaluation, outputs and resumable state shared by the defense scripts (AFT, PBE, PUD)."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.device = dist.init(pick_device(args.device))  # torchrun (AFT, PBE): join the group, this rank's device
        loaded = prepare_out_dir(SCRIPT_OF[name], args)
        self.gen = seed_everything(args.seed)
        self.inf: InfectedRun = load_infected(args, self.device)
        self.train_model = dist.wrap(self.inf.model, self.device)  # DDP under torchrun, else the model itself
        self.cl = args.channels_last != "off"
        self.run = RunDir(args.out_dir)
        self.ctl = RunControl(SCRIPT_OF[name], args, self.run, self.gen, loaded)
        self.history: list[dict] = []
        self.initial: dict = {}

    def start(self, carry: dict, **objects) -> dict:
        """Fresh run: write args.json, evaluate the infected model, save the first state. Resumed: restore. Returns the carry."""
        if self.ctl.resuming:
            saved = self.ctl.restore(**objects)
            self.initial, self.history = saved["initial"], saved["history"]
            return saved["loop"]
        self.run.start(dict(vars(self.args), defense=self.name, device_used=str(self.device)))
        print(f"{self.name}: {self.inf.ck['trigger']['type']} {self.inf.ck['attack_mode']} {self.inf.ck['dataset']} "
              f"model from {self.args.model_path} on {self.device}; writing to {self.args.out_dir}", flush=True)
        self.initial = self.evaluate(robust=True)
        print(log_line("initial", self.initial), flush=True)
        self.save("the initial evaluation", carry, **objects)
        return carry

    def save(self, position: str, carry: dict, **objects) -> None:
        self.ctl.save(position, {"loop": carry, "initial": self.initial, "history": self.history}, **objects)

    def evaluate(self, robust: bool = False) -> dict:
        m = self.inf.model
        out = evaluate(m, self.inf.test, self.inf.backdoor, self.args.eval_bs, generator=self.gen, channels_last=self.cl)
        if robust:
            out.update(robust_acc_from_args(m, self.inf.test, self.args))
        return out

    def log(self, rec: dict, prefix: str) -> None:
        rec["seconds"] = self.ctl.elapsed()
        self.history.append(rec)
        self.run.log(rec)
        print(log_line(prefix, rec), flush=True)

    def finish(self, settings: dict, extra_summary: dict | None = None, panels: dict | None = None,
               more_rows: list = ()) -> dict:
        """Final evaluation, model.pt, curves.png (``panels`` per epoch, then ``more_rows``), summary.json."""
        final = self.evaluate(robust=True)
        keys = ("clean_acc", "target_class_acc", "asr", "asr_incl_target", "robust_acc", "noise_acc")
        summary = {"defense": self.name, "initial": {k: self.initial[k] for k in keys if k in self.initial},
                   "final": {k: final[k] for k in keys if k in final}, "robust_eval": final.get("robust_eval"),
                   "settings": settings, "seconds": self.ctl.elapsed(), **(extra_summary or {})}
        inf = self.inf
        payload = checkpoint_payload(inf.attack_args, inf.model, inf.backdoor, inf.poisoned, inf.ck.get("train_indices"),
                                     summary["final"], {"defense": {"name": self.name, "settings": settings,
                                                                    "history": self.history, "source": self.args.model_path}})
        save_checkpoint(self.run.file("model.pt"), payload)
        plot_curves(self.run.records(), self.run.file("curves.png"),
                    panels or {"accuracy": ["clean_acc", "robust_acc"], "attack success": ["asr"]}, more_rows=more_rows)
        self.run.write_json("summary.json", summary)
        self.ctl.finish()
        print(log_line(f"final ({summary['seconds']:.0f}s)", summary["final"]) + f" | {self.args.out_dir}", flush=True)
        dist.finish()
        return summary
