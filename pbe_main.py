"""Repair an infected model: AFT with a small clean extra set (default) or progressive PBE (--progressive).

    python pbe_main.py --model_path runs/attack/model.pt               # AFT, model-repair setting
    python pbe_main.py --model_path runs/attack/model.pt --progressive # PBE, no clean data
"""
from config import parse_args
from utils.defenses.pbe import run_pbe_main
from utils.run.errors import run_cli


def main(argv=None):
    return run_pbe_main(parse_args("pbe", argv))


if __name__ == "__main__":
    run_cli(main)
