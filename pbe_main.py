"""Repair an infected model: AFT with a small clean extra set (default) or progressive PBE (--progressive).

    python pbe_main.py --model_path runs/attack/model.pt               # AFT, model-repair setting
    python pbe_main.py --model_path runs/attack/model.pt --progressive # PBE, no clean data
"""
from config import parse_args
from utils.run.errors import run_cli
from utils.defenses.pbe import run_aft, run_pbe


def main(argv=None):
    args = parse_args("pbe", argv)
    return run_pbe(args) if args.progressive else run_aft(args)


if __name__ == "__main__":
    run_cli(main)
