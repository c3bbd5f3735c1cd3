"""The evidence a defense weighs before it relies on one backdoor target (utils/defenses/filtering.py)."""
import torch

from utils.defenses.filtering import decide_target, decisive
from utils.defenses.target import vote_result


def _vote(counts):
    return vote_result(torch.tensor(counts))


def test_a_decisive_vote_is_ahead_of_every_other_class():
    assert decisive(_vote([289, 18, 19, 15, 28, 2, 19, 14, 49, 47]))  # measured: blend, PreActResNet18
    assert not decisive(_vote([52, 25, 60, 52, 54, 17, 43, 49, 57, 91]))  # measured: patch, a spread vote
    assert not decisive(_vote([120, 100, 90, 80, 70, 60, 50, 40, 30, 20]))  # the winner is not weak-free / ahead
    assert not decisive(None) and not decisive({"estimate": None, "vote_share": None})


def test_the_target_is_confirmed_by_the_split_or_a_decisive_vote_else_the_defense_goes_class_agnostic():
    clear, spread = _vote([289, 18, 19, 15, 28, 2, 19, 14, 49, 47]), _vote([52, 25, 60, 52, 54, 17, 43, 49, 57, 91])
    d = decide_target(None, clear, [])
    assert (d["mode"], d["target"]) == ("target", 0) and "decisive" in d["why"]
    d = decide_target(None, spread, [0])  # the vote points at 9, the split found the poison cluster in 0
    assert (d["mode"], d["target"]) == ("agnostic", None)  # the vote's winner (9) is not confirmed
    d = decide_target(0, spread, [0])  # a given target with its poison cluster: confirmed
    assert (d["mode"], d["target"]) == ("target", 0) and "split" in d["why"]
    d = decide_target(3, clear, [0])  # a wrong given target: replaced by the confirmed vote winner, and said so
    assert (d["mode"], d["target"]) == ("target", 0) and "given target 3 is not confirmed" in d["why"]
    d = decide_target(3, spread, [])  # all2all-like: nothing confirmed
    assert (d["mode"], d["target"]) == ("agnostic", None) and d["given"] == 3 and not d["vote_decisive"]
