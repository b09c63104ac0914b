#!/usr/bin/env bash
# This project's step against timm's on ONE card, same run: CoAtNet-0 at batch 256 and CoAtNet-2 at
# batch 128, 224 px, bf16, train and inference; timm eager and torch.compile. Ratios print last.
#
#   bash benchmarks/run_gpu.sh [all|ours|timm|table]    (default all; results in $RESULTS)
#
# Parts exist so that a 10-minute command limit can run them as separate calls on one warm machine
# (ours ~4 min, timm ~8 min with torch.compile, measured compile times 46-103 s per step);
# QUICK=1 skips torch.compile for inference. The device image lacks ml_collections: carry its
# pure-Python wheel in build/wheels (pip download --no-deps ml_collections==1.1.0 -d build/wheels;
# PyYAML, its one dependency, comes with timm) and it is put on PYTHONPATH
# here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
# build/ is git-ignored and stays on a warm device machine between calls; each part copies the
# results to $OUT (the device tool's return folder) when it is set.
RESULTS=${RESULTS:-build/bench.jsonl}
mkdir -p "$(dirname "$RESULTS")"
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
CASES=("coatnet_0 256" "coatnet_2 128")

if ! python -c 'import ml_collections' 2>/dev/null; then
  # A pure-Python wheel imports straight from its zip: nothing is installed.
  WHEEL=$(ls build/wheels/ml_collections-*.whl 2>/dev/null | head -1)
  [[ -n "$WHEEL" ]] || { echo "ml_collections missing: carry build/wheels (see above)" >&2; exit 1; }
  export PYTHONPATH="$PWD/$WHEEL${PYTHONPATH:+:$PYTHONPATH}"
fi

ours() {
  for c in "${CASES[@]}"; do
    set -- $c
    for mode in train inference; do
      python benchmarks/train_throughput.py --variant "$1" --batch "$2" --res 224 \
        --dtype bfloat16 --steps "$STEPS" --warmup "$WARMUP" --mode "$mode" | tail -1 >> "$RESULTS"
    done
  done
}

timm_runs() {
  for c in "${CASES[@]}"; do
    set -- $c
    for mode in train inference; do
      python benchmarks/timm_peer.py --model "${1}_224" --batch "$2" --steps "$STEPS" \
        --warmup "$WARMUP" --mode "$mode" | tail -1 >> "$RESULTS"
      if [[ "$mode" == train || -z "${QUICK:-}" ]]; then
        python benchmarks/timm_peer.py --model "${1}_224" --batch "$2" --steps "$STEPS" \
          --warmup "$WARMUP" --mode "$mode" --compile | tail -1 >> "$RESULTS"
      fi
    done
  done
}

table() {
  python - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith('{')]
versions = {k: v for r in rows for k, v in r.items() if k in ('jax', 'torch', 'timm')}
print('device:', rows[0]['device'] if rows else '?', '|', versions)
f = lambda x, fmt: '-' if x is None else fmt.format(x)
print('| model | mode | batch | impl | img/s | MFU | peak GiB | compile s |')
print('|---|---|---|---|---|---|---|---|')
for r in rows:
  print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['impl']} | {r['img_per_s']:.0f} | "
        f"{f(r['mfu'], '{:.1%}')} | {f(r['peak_mem_gib'], '{:.1f}')} | {r['compile_s']:.0f} |")
print('\n| model | mode | ours img/s | best timm img/s (impl) | ratio | goal | memory ours/timm |')
print('|---|---|---|---|---|---|---|')
goals = {('coatnet_0', 'train'): 2.5, ('coatnet_2', 'train'): 2.0}
for r in (r for r in rows if r['impl'] == 'coatnet_jax'):
  peers = [p for p in rows if p['impl'].startswith('timm') and p['mode'] == r['mode']
           and p['model'] == r['model'] + '_224' and p['batch'] == r['batch']]
  if not peers:
    continue
  best = max(peers, key=lambda p: p['img_per_s'])
  goal = goals.get((r['model'], r['mode']), 2.0)
  ratio = r['img_per_s'] / best['img_per_s']
  mem = (f"{r['peak_mem_gib']:.1f}/{best['peak_mem_gib']:.1f}"
         if r['peak_mem_gib'] and best['peak_mem_gib'] else '-')
  print(f"| {r['model']} | {r['mode']} | {r['img_per_s']:.0f} | {best['img_per_s']:.0f} "
        f"({best['impl']}) | {ratio:.2f}x | {'met' if ratio >= goal else 'NOT met'} "
        f"(>= {goal}x) | {mem} |")
EOF
}

case "$PART" in
  all) ours; timm_runs; table ;;
  ours) ours ;;
  timm) timm_runs ;;
  table) table ;;
  *) echo "usage: $0 [all|ours|timm|table]" >&2; exit 2 ;;
esac
if [[ -n "${OUT:-}" && -f "$RESULTS" ]]; then cp "$RESULTS" "$OUT/"; fi
