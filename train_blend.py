"""Train a backdoor-infected classifier (any trigger, despite the name: see --trigger_type).

    python train_blend.py --dataset synthetic --arch cnn --trigger_type blend --n_iters 5
"""
from config import parse_args
from utils.attack import run_attack
from utils.run.errors import run_cli


def main(argv=None):
    return run_attack(parse_args("attack", argv))


if __name__ == "__main__":
    run_cli(main)
