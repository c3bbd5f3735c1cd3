"""A defense run's shared set-up, evaluation and outputs (AFT, PBE and PUD all use one ``DefenseSession``)."""
from __future__ import annotations

import time

from utils.attack import checkpoint_payload, log_line
from utils.checkpoint import save_checkpoint
from utils.defense import InfectedRun, load_infected
from utils.evaluation import evaluate
from utils.plots import plot_curves
from utils.robust import robust_acc_from_args
from utils.runlog import RunDir, check_out_dir
from utils.runtime import pick_device, seed_everything


class DefenseSession:
    """Set-up, evaluation and outputs shared by the defense scripts (AFT, PBE, PUD)."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.device = pick_device(args.device)
        check_out_dir(args.out_dir, args.overwrite)
        self.gen = seed_everything(args.seed)
        self.inf: InfectedRun = load_infected(args, self.device)
        self.cl = args.channels_last != "off"
        self.run = RunDir(args.out_dir)
        self.t0 = time.time()
        self.history: list[dict] = []

    def start(self) -> dict:
        self.run.start(dict(vars(self.args), defense=self.name, device_used=str(self.device)))
        print(f"{self.name}: {self.inf.ck['trigger']['type']} {self.inf.ck['attack_mode']} {self.inf.ck['dataset']} "
              f"model from {self.args.model_path} on {self.device}; writing to {self.args.out_dir}", flush=True)
        self.initial = self.evaluate(robust=True)
        print(log_line("initial", self.initial), flush=True)
        return self.initial

    def evaluate(self, robust: bool = False) -> dict:
        m = self.inf.model
        out = evaluate(m, self.inf.test, self.inf.backdoor, self.args.eval_bs, generator=self.gen, channels_last=self.cl)
        if robust:
            out.update(robust_acc_from_args(m, self.inf.test, self.args))
        return out

    def log(self, rec: dict, prefix: str) -> None:
        rec["seconds"] = round(time.time() - self.t0, 2)
        self.history.append(rec)
        self.run.log(rec)
        print(log_line(prefix, rec), flush=True)

    def finish(self, settings: dict, extra_summary: dict | None = None, panels: dict | None = None) -> dict:
        final = self.evaluate(robust=True)
        keys = ("clean_acc", "asr", "asr_incl_target", "robust_acc", "noise_acc")
        summary = {"defense": self.name, "initial": {k: self.initial[k] for k in keys if k in self.initial},
                   "final": {k: final[k] for k in keys if k in final}, "robust_eval": final.get("robust_eval"),
                   "settings": settings, "seconds": round(time.time() - self.t0, 2), **(extra_summary or {})}
        inf = self.inf
        payload = checkpoint_payload(inf.attack_args, inf.model, inf.backdoor, inf.poisoned, inf.ck.get("train_indices"),
                                     summary["final"], {"defense": {"name": self.name, "settings": settings,
                                                                    "history": self.history, "source": self.args.model_path}})
        save_checkpoint(self.run.file("model.pt"), payload)
        plot_curves(self.run.records(), self.run.file("curves.png"),
                    panels or {"accuracy": ["clean_acc", "robust_acc"], "attack success": ["asr"]})
        self.run.write_json("summary.json", summary)
        print(log_line(f"final ({summary['seconds']:.0f}s)", summary["final"]) + f" | {self.args.out_dir}", flush=True)
        return summary
