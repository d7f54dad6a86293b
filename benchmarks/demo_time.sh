#!/usr/bin/env bash
# Times the README's main command (`aepretrain run`, the quick preset; install excluded) and prints the
# wall time, the CPU, the load before and after (other processes inflate the time), and both arms' test
# accuracy. Run it from a clone after the README's install line, with nothing else running:
#   benchmarks/demo_time.sh [more `aepretrain run` options, e.g. --precision 32]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d "${TMPDIR:-/tmp}/aepretrain-demo.XXXXXX")
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
flags=$(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
echo "cpu: $cpu, $(nproc) cores available, ${flags:-no avx2}"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
.venv/bin/aepretrain run --out "$out/run" --quiet "$@" >"$out/run.log" 2>&1 || { cat "$out/run.log"; exit 1; }
end=$(date +%s.%N)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python - "$out/run/metrics.json" "$start" "$end" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min), precision {m['precision']}")
print("pre-training: " + ", ".join(f"stage {s['stage']} {s['seconds']:.0f} s" for s in m["pretrain"]["stages"]))
for arm, r in m["finetune"].items():
    print(f"{arm}: test accuracy {r['test_accuracy']:.4f}, {r['epochs']} epochs in {r['seconds']:.0f} s")
EOF
echo "run folder: $out/run"
