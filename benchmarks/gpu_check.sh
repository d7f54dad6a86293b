#!/usr/bin/env bash
# One CUDA GPU, under 10 minutes: the throughput bench of the seed preset, a smoke run of it end to end, and a
# timed run of it on synthetic data the size of Oxford-IIIT Pet (37 classes, 100 images per class in train + val:
# 3,700 against Oxford's 3,680, so the autoencoders' third and the fine-tuning split match the reference's;
# the synthetic test split is half that), at 224 px, then the fine-tuned classifier tested on the GPU and on the
# CPU (the device path of `evaluate`: pinned batches, the model moved there and back). Writes one JSON: GPU name,
# torch version, each step's wall seconds and exit status, the bench rows, the runs' per-stage and per-arm
# seconds and test accuracies; each step's output goes to a folder beside it (NAME-logs/).
#   benchmarks/gpu_check.sh [OUTPUT.json]     (default: $OUT/gpu_check.json, else ./gpu_check.json)
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3); EPOCHS_PRETRAIN (3),
# EPOCHS_FINETUNE (10) and PER_CLASS (100) size the timed run. Without a CUDA GPU it exits 3 at once.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
result=${1:-${OUT:+$OUT/gpu_check.json}}
result=${result:-gpu_check.json}
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's aepretrain, installed or not

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    torch_version=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "not importable")
    echo "gpu_check: error: no CUDA GPU: torch.cuda.is_available() is false (python $python, torch $torch_version);" \
         "run this on a machine with one" >&2
    exit 3
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/aepretrain-gpu-check.XXXXXX")
export AEPRETRAIN_CACHE="$work/cache"  # a fresh cache: the timed run decodes nothing, but builds its own store
steps="$work/steps.tsv"
: >"$steps"

step() {  # step NAME SECONDS COMMAND...: run with a time limit (stdout to $work/NAME.out, stderr to NAME.log),
    local name=$1 limit=$2  # and record its status and wall milliseconds
    shift 2
    local start status
    echo "gpu_check: $name (at most ${limit} s)" >&2
    start=$(date +%s%N)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$work/$name.out" 2>"$work/$name.log"
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( ($(date +%s%N) - start) / 1000000 ))" >>"$steps"
    [ "$status" -eq 0 ] || { echo "gpu_check: $name ended with status $status; its last lines:" >&2;
                             tail -n 5 "$work/$name.log" >&2; }
}

aep=("$python" -m aepretrain)
step bench 100 "${aep[@]}" bench --preset seed --seconds 3 --json
step smoke 90 "${aep[@]}" run --preset seed --smoke --dataset synthetic --quiet --out "$work/smoke"
step oxford_sized 300 "${aep[@]}" run --preset seed --dataset synthetic --quiet --out "$work/oxford" \
    --set data.synthetic_classes=37 --set "data.synthetic_per_class=${PER_CLASS:-100}" \
    --set "pretrain.epochs=${EPOCHS_PRETRAIN:-3}" --set "finetune.epochs=${EPOCHS_FINETUNE:-10}"
step evaluate_devices 90 "$python" - "$work/oxford" <<'EOF'
# The pre-trained arm's classifier tested on the GPU (as the run did) and on the CPU: the same accuracy but for
# the last digits of TF32 convolutions, and the seconds each took.
import json, sys, time
from pathlib import Path
import torch
from aepretrain.checkpoints import load_classifier
from aepretrain.data import prepare
from aepretrain.evaluate import evaluate
classifier, meta = load_classifier(Path(sys.argv[1]) / "checkpoints" / "classifier-pretrained.safetensors")
bundle = prepare(meta["config"].data, meta["split_seed"], progress=False)
out = {}
for device in ("cuda", "cpu"):
    start = time.perf_counter()
    scores = evaluate(classifier, bundle.test, bundle.classes, torch.device(device))
    out[device] = {"test_accuracy": scores["test_accuracy"], "test_loss": scores["test_loss"],
                   "seconds": round(time.perf_counter() - start, 2), "images": len(bundle.test)}
assert next(classifier.parameters()).device.type == "cpu", "evaluate left the classifier on the GPU"
Path(sys.argv[1], "evaluate_devices.json").write_text(json.dumps(out))
print(json.dumps(out))
EOF

"$python" - "$work" "$result" <<'EOF'
import json, subprocess, sys
from pathlib import Path
import torch
work, result = Path(sys.argv[1]), Path(sys.argv[2])
logs = result.with_name(result.stem + "-logs")  # each step's stdout (.out) and stderr (.log), beside the JSON

def loaded(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

def run_summary(folder):
    m = loaded(folder / "metrics.json")
    if m is None:
        return None
    return {"precision": m.get("precision"), "dataset": {k: m["dataset"].get(k) for k in ("train", "val", "test")},
            "pretrain_seconds": [s["seconds"] for s in m.get("pretrain", {}).get("stages", [])],
            "pretrain_epochs": [s["epochs"] for s in m.get("pretrain", {}).get("stages", [])],
            "test_mse": m.get("pretrain", {}).get("test_mse"),
            "arms": {arm: {k: r.get(k) for k in ("test_accuracy", "test_loss", "best_val_accuracy", "epochs",
                                                  "seconds")} for arm, r in m.get("finetune", {}).items()}}

try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError as exc:
    smi = f"nvidia-smi: {exc.strerror}"
report = {
    "gpu": torch.cuda.get_device_name(0), "nvidia_smi": smi,
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "steps": {name: {"status": int(status), "seconds": round(int(ms) / 1000, 1)}
              for name, status, ms in (line.split("\t") for line in (work / "steps.tsv").read_text().splitlines())},
    "bench": loaded(work / "bench.out"),
    "smoke": run_summary(work / "smoke"), "oxford_sized": run_summary(work / "oxford"),
    "evaluate_devices": loaded(work / "oxford" / "evaluate_devices.json"), "work": str(work),
    "logs": str(logs),
}
result.parent.mkdir(parents=True, exist_ok=True)
logs.mkdir(exist_ok=True)
for log in [*work.glob("*.log"), *work.glob("*.out")]:
    (logs / log.name).write_bytes(log.read_bytes())
result.write_text(json.dumps(report, indent=1))
print(f"gpu_check: wrote {result}", file=sys.stderr)
sys.exit(0 if all(s["status"] == 0 for s in report["steps"].values()) else 1)
EOF
