"""PUD machine-unlearning loss: CE on clean − λ·CE on identified poison + μ·L1(θ, θ_ref).

The clean term can weigh every class alike (``balanced_class_weights``), so a class the filtering thinned is
not forgotten under the ascent.

The ascent term can be bounded: the authors' code does not bound it, and unbounded gradient ascent diverges once
the poison CE grows. The reference network is an explicit frozen argument (in the authors' code it was a randomly
initialised network; docs/pud.md).

``AscentObjective`` is the one training objective that applies the loss batch by batch: PUD's unlearning stage and
PBE's later rounds (which ascend on what PBE's detector flagged, so that clean fine-tuning does not revive the
backdoor) both use it. ``HeldLayer`` keeps PUD's classifier layer where it is while the ascent runs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.run import distributed as dist

__all__ = ["ASCENT_WHERE", "AscentObjective", "HeldLayer", "POISON_LOSS_BOUND", "PoisonStream", "ShieldedHead",
           "ascent_decision", "balanced_class_weights", "bounded_poison_ce", "classifier_layer", "disowned_enough",
           "joined_forward", "l1_distance", "unlearning_loss"]

POISON_LOSS_BOUND = 10.0  # the default bound of the ascent term (PUD's --poison_loss_bound, PBE's ascent)
ASCENT_WHERE = ("split", "always")  # --unlearn_where: when the ascent term is used


def ascent_decision(lam: float, candidates_mode: str, where: str = "split", lam_unconfirmed: float = 0.0,
                    disowned: Optional[float] = None, disowned_min: float = 0.0) -> dict:
    """Whether the ascent on the identified poisons is used, with which weight, and why (for ``summary.json``).

    ``where`` split: the full weight ``lam`` only when the poisons were ranked within the class split's cluster of a
    confirmed target, the one place they are poisons by construction (100 % precise on every all2one cell of the
    quick grids). Elsewhere (all2all, a clean-label attack) they hold clean images too (the union of PBE's flags:
    75-77 % precise on blend, patch and SIG all2all), and a full-weight ascent unlearns those: on blend all2all
    PUD loses 5 points of clean accuracy to it for no lower ASR, PBE 9 (docs/ablations.md). There the weight is
    ``lam_unconfirmed`` (0: no ascent): PBE's 0.03 stops its clean rounds reviving all2all backdoors for a few
    points of accuracy. ``always``: ``lam`` everywhere (the papers').

    ``disowned``: the share of the poison set the model (after the defense's clean fine-tuning) gives another label
    than its own. Where a target is confirmed but the split found no cluster (``target`` candidates), a set it
    mostly disowns (>= ``disowned_min``; 0: never) is mislabelled images, dirty-label poisons, and gets ``lam``
    (PUD then ascends on every target sample the model disowns): SIG's poisons that look like two classes to the
    split (94 % disowned, 91 % of the set poisons), where clean-label SIG's set of genuine target images is 18 %
    disowned (docs/ablations.md).
    """
    if lam == 0:
        return {"used": False, "why": "--unlearn_lambda 0"}
    if candidates_mode == "split":
        return {"used": True, "lambda": lam, "why": "the poisons were ranked within a confirmed target's split cluster"}
    if where == "always":
        return {"used": True, "lambda": lam, "why": "--unlearn_where always"}
    if candidates_mode == "target" and disowned_enough(disowned, disowned_min):
        return {"used": True, "lambda": lam, "disowned": disowned,
                "why": f"a confirmed target's samples, {disowned:.0%} of them given another label by the model "
                       f"(>= {disowned_min:.0%}): mislabelled images, not the class's own"}
    unconfirmed = (f"the poisons were ranked among the {candidates_mode!r} candidates, not a confirmed target's split "
                   "cluster: they may hold clean images")
    if disowned is not None:
        unconfirmed += f"; the model gives {disowned:.0%} of them another label"
    if lam_unconfirmed == 0:
        return {"used": False, "why": unconfirmed}
    return {"used": True, "lambda": lam_unconfirmed, "why": unconfirmed + ", so the weaker unconfirmed weight"}


def disowned_enough(share: Optional[float], minimum: float) -> bool:
    """Whether a poison set the model gives another label in this ``share`` counts as mislabelled images
    (``minimum`` 0: never)."""
    return share is not None and minimum > 0 and share >= minimum


def l1_distance(model: nn.Module, reference: nn.Module) -> Tensor:
    """Σ over parameters matched BY NAME of |θ − θ_ref|. The reference is detached, so no gradient reaches it.

    Raises KeyError if a model parameter has no counterpart in the reference, and ValueError on a shape mismatch.
    Silent mismatches would make the penalty meaningless.
    """
    ref = dict(reference.named_parameters())
    terms = []
    for name, p in model.named_parameters():
        if name not in ref:
            raise KeyError(f"parameter {name!r} missing from the reference model")
        r = ref[name].detach()
        if r.shape != p.shape:
            raise ValueError(f"shape mismatch for {name!r}: {tuple(p.shape)} vs reference {tuple(r.shape)}")
        terms.append((p - r.to(device=p.device, dtype=p.dtype)).abs().sum())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _mean_ce(logits: Tensor, y: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy (weighted by class with ``weight``). Zero rows give a graph-connected 0, so an empty clean
    or poison part adds nothing."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, weight=None if weight is None else weight.to(dtype=logits.dtype))


def balanced_class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class weights under which every label present in ``labels`` counts as much as any other (absent: 0).

    Unlearning's ascent pushes the poisons' images away from the target label; a target class the filtering
    thinned (43 classes: about 120 genuine images among 6,000) is then outweighed in the clean term and forgotten.
    """
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, len(labels) / (max(present, 1) * counts.clamp_min(1)), torch.zeros_like(counts))
    return w.float()


def bounded_poison_ce(logits_poison: Tensor, y_poison: Tensor,
                      bound: Optional[float] = None) -> Tuple[Tensor, Tensor, bool]:
    """The ascent term: the poison set's mean CE, clamped at ``bound`` (its gradient is 0 past it). Returns the term,
    the unclamped CE and whether it was clamped."""
    ce = _mean_ce(logits_poison, y_poison)
    if bound is None or logits_poison.shape[0] == 0:
        return ce, ce, False
    return torch.clamp(ce, max=float(bound)), ce, bool(ce.detach().item() > bound)


def unlearning_loss(logits_clean: Tensor, y_clean: Tensor, logits_poison: Tensor, y_poison: Tensor,
                    model: nn.Module, reference: Optional[nn.Module], lam: float = 0.003, mu: float = 1e-4,
                    poison_loss_bound: Optional[float] = None,
                    class_weight: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Union[float, bool]]]:
    """loss = CE(clean) − lam·CE(poison) + mu·L1(model, reference); defaults are the authors' 0.003 / 1e-4.

    y_poison are the poisoned (backdoor-target) labels, so the ascent pushes predictions away from the backdoor.
    With poison_loss_bound, the ascent term is min(CE_poison, bound). Past the bound it is constant, its gradient
    is 0, and parts["poison_clipped"] is True. Returns (loss, parts) where parts holds floats: clean_ce,
    poison_ce (unclipped), l1, loss, and the bool poison_clipped. ``class_weight`` weighs the clean term by class
    (``balanced_class_weights``).
    """
    ce_clean = _mean_ce(logits_clean, y_clean, class_weight)
    ascent, ce_poison, clipped = bounded_poison_ce(logits_poison, y_poison, poison_loss_bound)
    l1 = l1_distance(model, reference).to(ce_clean.device) if mu > 0 and reference is not None \
        else ce_clean.new_zeros(())
    loss = ce_clean - lam * ascent + mu * l1
    parts = {
        "clean_ce": float(ce_clean.detach().item()),
        "poison_ce": float(ce_poison.detach().item()),
        "l1": float(l1.detach().item()),
        "loss": float(loss.detach().item()),
        "poison_clipped": clipped,
    }
    return loss, parts


def classifier_layer(model: nn.Module) -> Optional[nn.Linear]:
    """The model's last ``nn.Linear``: its classifier layer (``cnn``'s ``fc``, PreActResNet18's ``linear``,
    torchvision ResNet18's ``fc``); None for a model without one (e.g. a 1x1-convolution classifier of other
    code)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return layers[-1] if layers else None


class HeldLayer:
    """Keeps a layer's parameters where they were when it was made: ``restore`` (after every optimiser step) copies
    them back, ``release`` drops the optimiser's momentum for them at the end.

    PUD holds its classifier layer while it ascends on the poison set. An ascent free to move that layer pushes the
    poisons away from the target mostly by reading the target class less, which costs the class's own images
    (43-class patch: the target class 93.9 -> 79.6 % over unlearning); with the layer held, it can only change how
    the network sees the trigger (the class ends unlearning at 89.8 %, docs/ablations.md). Copying back, not
    ``requires_grad_(False)``, because DDP fixes the set of parameters it reduces when it wraps the model.
    """

    def __init__(self, layer: nn.Module):
        self.params = list(layer.parameters())
        self.saved = [p.detach().clone() for p in self.params]

    def restore(self, _i: int | None = None) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved):
                p.copy_(saved)

    def release(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.params:
            optimizer.state.pop(p, None)


class PoisonStream:
    """Batches of the poison set without end: reshuffled and restarted whenever it runs out. Under torchrun every
    rank restarts its shard at the same batch (the shards are equal)."""

    def __init__(self, data, poison_set: Tensor, batch_size: int, generator: torch.Generator, augment=None):
        self.data, self.poison_set, self.bs = data, poison_set, batch_size
        self.generator, self.augment = generator, augment
        self._batches = iter(())

    def next(self):
        batch = next(self._batches, None)
        if batch is None:
            self._batches = iter(dist.epoch_batches(self.data, self.bs, self.generator, self.augment,
                                                    indices=self.poison_set))
            batch = next(self._batches)
        return batch


def joined_forward(train_model: nn.Module, xc: Tensor, xp: Tensor, channels_last: bool = False,
                   shield: Optional[nn.Linear] = None) -> Tuple[Tensor, Tensor]:
    """One forward of a clean batch joined by a poison batch (their BatchNorm statistics taken together, as the
    ascent has always trained); returns the clean and the poison logits. With ``shield`` (the classifier layer)
    the poison rows go through a detached copy of that layer, so the ascent's gradient stops there
    (``ShieldedHead``)."""
    x = torch.cat([xc, xp])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if shield is None or len(xp) == 0:
        logits = train_model(x)
    else:
        with ShieldedHead(shield, len(xc)):
            logits = train_model(x)
    return logits[:len(xc)], logits[len(xc):]


class ShieldedHead:
    """While active, the rows from ``first`` on leave ``layer`` (an ``nn.Linear``) through a detached copy of its
    weights: their loss still trains the network below the layer, never the layer itself.

    PBE fine-tunes its classifier layer on the clean extra set while it ascends on the flagged poisons; free to move
    that layer, the ascent pushes the poisons off the target mostly by reading the target class less (PUD holds the
    layer outright while it only ascends, ``HeldLayer``). A forward hook, so DDP still sees one forward and reduces
    every gradient.
    """

    def __init__(self, layer: nn.Linear, first: int):
        self.layer, self.first, self._handle = layer, first, None

    def _hook(self, module: nn.Linear, inputs, output: Tensor) -> Tensor:
        rows = inputs[0][self.first:]
        bias = None if module.bias is None else module.bias.detach()
        tail = F.linear(rows, module.weight.detach(), bias).to(output.dtype)
        return torch.cat([output[:self.first], tail])

    def __enter__(self):
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


class AscentObjective:
    """``train_epoch``'s ``loss_fn`` for one unlearning epoch: each clean batch is joined by the next batch of the
    poison set (a ``PoisonStream``) and trained on ``unlearning_loss``.

    The sums of the loss parts over the epoch are kept for the run's records. ``train_model`` is the DDP wrapper
    under torchrun. With ``lam`` 0 (no ascent) no poison batch is drawn: it would add nothing to the loss but a
    forward pass and its images in the clean batch's BatchNorm statistics; the records then have no ``poison_ce``.
    ``shield``: the classifier layer the ascent's gradient must not reach (``ShieldedHead``).
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, data, poison_set: Tensor, batch_size: int,
                 generator: torch.Generator, augment=None, channels_last: bool = False, lam: float = 0.003,
                 mu: float = 0.0, bound: Optional[float] = None, reference: Optional[nn.Module] = None,
                 class_weight: Optional[Tensor] = None, shield: Optional[nn.Linear] = None):
        self.model, self.train_model, self.reference, self.shield = model, train_model, reference, shield
        self.poison_set, self.cl = poison_set, channels_last
        self.lam, self.mu, self.bound, self.class_weight = lam, mu, bound, class_weight
        self._poison = PoisonStream(data, poison_set, batch_size, generator, augment) if lam > 0 else None
        self.sums = {"clean_ce": 0.0, "poison_ce": 0.0, "loss": 0.0} if lam > 0 else {"clean_ce": 0.0, "loss": 0.0}
        self.batches = self.clipped_batches = self.images = 0  # images: poison-set images joined so far

    def __call__(self, i: int, xc: Tensor, yc: Tensor):
        if self._poison is None:
            xp, yp = xc[:0], yc[:0]
        else:
            _, xp, yp = self._poison.next()
        logits_c, logits_p = joined_forward(self.train_model, xc, xp, self.cl, self.shield)
        loss, parts = unlearning_loss(logits_c, yc, logits_p, yp, self.model, self.reference,
                                      lam=self.lam, mu=self.mu, poison_loss_bound=self.bound,
                                      class_weight=self.class_weight)
        for k in self.sums:
            self.sums[k] += parts[k]
        self.clipped_batches += int(parts["poison_clipped"])
        self.batches += 1
        self.images += len(yp)
        return loss, logits_c

    def means(self) -> dict:
        """The epoch's mean loss parts, averaged over ranks."""
        return dist.mean_over_ranks({k: v / max(self.batches, 1) for k, v in self.sums.items()})
