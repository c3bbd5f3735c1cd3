#!/usr/bin/env bash
# One check of a CUDA machine (under 8 minutes on one GPU) that prints one JSON on stdout:
#   - benchmarks/bench.py for cnn and preactresnet18, with --amp and --compile off and on;
#   - benchmarks/bench_defense.py: the README's quick AFT, PBE and PUD on the synthetic set;
#   - a 2-process torchrun attack epoch (two GPUs: nccl; fewer: gloo on the CPU, said so).
# Without CUDA it runs the CPU part only (bench.py cnn, the defense benchmark, torchrun on gloo) and lists
# what it skipped and why in "skipped". Progress goes to stderr.
#
#   benchmarks/gpu_check.sh > gpu-check.json      # from the repository root, with the venv active
#   GPU_CHECK_TINY=1 benchmarks/gpu_check.sh      # tiny settings everywhere (what the test runs; seconds)
#   GPU_CHECK_THREADS=1 ...                       # --threads of the CPU parts (default: torch's choice)
#   GPU_CHECK_DEFENSES="aft" ...                  # the defense benchmark's defenses (default: aft pbe pud)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TINY=${GPU_CHECK_TINY:-0}
THREADS=${GPU_CHECK_THREADS:-}
DEFENSES=${GPU_CHECK_DEFENSES:-aft pbe pud}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$OUT"' EXIT
START=$(date +%s)
SKIPPED=()
log() { echo "gpu_check: $*" >&2; }
thr() { if [ -n "$THREADS" ]; then echo "--threads $THREADS"; fi; }

GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -gt 0 ]; then DEVICE=cuda; else DEVICE=cpu; fi
log "device $DEVICE ($GPUS CUDA devices), tiny=$TINY"

if [ "$TINY" = 1 ]; then BENCH_SIZE="--bs 16 --batches 2 --repeats 1"; else BENCH_SIZE="--repeats 3"; fi
if [ "$DEVICE" = cuda ]; then
    ARCHS="cnn preactresnet18"; SWITCHES="off:off on:off off:on on:on"
else
    ARCHS="cnn"; SWITCHES="off:off"
    SKIPPED+=("bench.py preactresnet18: a CPU run takes minutes, not part of the quick CPU check")
    SKIPPED+=("bench.py --amp on / --compile: CUDA-only parts of this check (bench.py measures them on CPU when asked)")
fi
for arch in $ARCHS; do
    for sw in $SWITCHES; do
        amp=${sw%%:*}; comp=${sw##*:}
        flags="--arch $arch --device $DEVICE --amp $amp $BENCH_SIZE $(thr)"
        if [ "$comp" = on ]; then flags="$flags --compile"; fi
        log "bench.py $flags"
        $PY -m benchmarks.bench $flags --json "$OUT/bench-$arch-amp_$amp-compile_$comp.json" >&2
    done
done

if [ "$TINY" = 1 ]; then DEF="--tiny"; else DEF=""; fi
log "bench_defense.py $DEF --defenses $DEFENSES"
# shellcheck disable=SC2086  # DEFENSES is a list of words
$PY -m benchmarks.bench_defense $DEF --defenses $DEFENSES --device $DEVICE $(thr) --json "$OUT/defense.json" >&2

if [ "$GPUS" -ge 2 ]; then TR_DEVICE=cuda; else TR_DEVICE=cpu; fi
if [ "$DEVICE" = cuda ] && [ "$GPUS" -lt 2 ]; then
    SKIPPED+=("torchrun on two GPUs: one GPU only, the 2-process epoch ran on gloo/CPU")
fi
if [ "$TINY" = 1 ]; then TR_SIZE="--train_subset 400 --test_subset 200"; else TR_SIZE=""; fi
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
log "torchrun --nproc_per_node 2 train_blend.py (one epoch, $TR_DEVICE)"
T0=$(date +%s.%N)
OMP_NUM_THREADS=${THREADS:-1} $PY -m torch.distributed.run --nproc_per_node 2 --master_port "$PORT" train_blend.py \
    --dataset synthetic --arch cnn --trigger_type blend --n_iters 1 --bs 64 $TR_SIZE --device $TR_DEVICE \
    --out_dir "$OUT/torchrun" >&2
T1=$(date +%s.%N)

SKIPPED_JSON=$(printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}" | $PY -c "import json, sys; print(json.dumps([l for l in sys.stdin.read().splitlines() if l]))")
$PY - "$OUT" "$DEVICE" "$GPUS" "$TINY" "$TR_DEVICE" "$T0" "$T1" "$START" "$SKIPPED_JSON" <<'EOF'
import glob, json, os, sys, time

out, device, gpus, tiny, tr_device, t0, t1, start, skipped = sys.argv[1:]
bench = {}
for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    with open(path) as f:
        r = json.load(f)
    bench[os.path.basename(path)[len("bench-"):-len(".json")]] = {k: r.get(k) for k in (
        "model_train_ips", "pipeline_train_ips", "pipeline_over_model", "pgd_ips", "pgd_cost_ratio", "eval_ips",
        "speedup_vs_reference", "mfu", "amp", "compile", "channels_last", "bs", "threads")}
with open(os.path.join(out, "defense.json")) as f:
    defense = json.load(f)
with open(os.path.join(out, "torchrun", "summary.json")) as f:
    tr = json.load(f)
import torch
print(json.dumps({
    "device": device, "cuda_devices": int(gpus), "gpu": torch.cuda.get_device_name(0) if int(gpus) else None,
    "tiny": tiny == "1", "bench": bench,
    "defense": {n: {k: d[k] for k in ("wall", "process", "training_share", "target_share", "stages", "final")}
                for n, d in defense["defenses"].items()},
    "torchrun_attack_epoch": {"device": tr_device, "processes": 2, "process_seconds": round(float(t1) - float(t0), 2),
                              "run_seconds": tr.get("seconds"), "final": tr.get("final")},
    "skipped": json.loads(skipped), "seconds": int(time.time()) - int(start), "torch": torch.__version__,
    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
EOF
