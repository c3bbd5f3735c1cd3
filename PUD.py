"""Purify an infected model without clean data: PUD (SPECTRE filtering, progressive adversarial fine-tuning,
machine unlearning and a mean-teacher stage).

    python PUD.py --model_path runs/attack/model.pt                    # target class estimated by PGD
    python PUD.py --model_path runs/attack/model.pt --target_label 0   # target class given
"""
from config import parse_args
from utils.defenses.pud import run_pud
from utils.run.errors import run_cli


def main(argv=None):
    return run_pud(parse_args("pud", argv))


if __name__ == "__main__":
    run_cli(main)
