#!/usr/bin/env bash
# The engine with its layers streamed from the container for every token, against the
# physical bound measured in the same run (raw sequential read of the same file ÷ bytes
# streamed per token), and the expert cache on the MoE fixtures.
#
#   bash benches/engine_stream.sh [REPS]
#
# 1. SmolLM2-135M Q4_1 under --ram 160MiB (it needs about 190 MiB resident): every layer
#    streams per token with O_DIRECT reads; tg32 at base and exact fidelity, each with the
#    raw O_DIRECT read of the container made just before and just after the tg test.
# 2. The three MoE fixtures with --stream-layers and expert caches of 0, 200 KB and 1 MB:
#    hit rate and bytes read per token.
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures=${TPDE_FIXTURES:-$HOME/.cache/tpde-fixtures}
reps=${1:-3}

cargo build --release --quiet
tpde=target/release/tpde
# The containers must sit on a file system that takes O_DIRECT (not tmpfs).
work=$(mktemp -d -p "${TPDE_BENCH_DIR:-target}")
trap 'rm -rf "$work"' EXIT
$tpde pack "$fixtures/smollm2-135m-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$work/smollm2.tpde" --json > /dev/null
$tpde pack "$fixtures/moe-mixtral-tiny" -o "$work/mixtral.tpde" --json > /dev/null
$tpde pack "$fixtures/moe-qwen-tiny" -o "$work/qwen.tpde" --json > /dev/null
$tpde pack "$fixtures/moe-mixtral-tiny-gguf/model.gguf" -o "$work/mixtral-gguf.tpde" --json > /dev/null
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; git $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty); $(date -u +%FT%TZ)"

for f in base exact; do
  $tpde --threads 2 bench "$work/smollm2.tpde" --ram 160MiB --direct --fidelity $f \
    -p 0 -n 32 --reps "$reps" --json > "$work/stream-$f.json"
done
for m in mixtral qwen mixtral-gguf; do
  for cap in 1 200KB 1MB; do
    $tpde --threads 2 bench "$work/$m.tpde" --stream-layers --expert-cache $cap \
      -p 0 -n 64 --reps 1 --json > "$work/moe-$m-$cap.json"
  done
done

python3 - "$work" <<'PY'
import json, sys, os
w = sys.argv[1]
print("SmolLM2-135M Q4_1, --ram 160MiB, layers streamed per token (O_DIRECT), 2 threads")
print(f"{'fidelity':<8} {'tg32 tok/s':>14} {'MB/token':>9} {'raw GB/s before/after':>22} {'bound tok/s':>12} {'tg ÷ bound':>11} {'peak RSS MiB':>13}")
for f in ("base", "exact"):
    r = json.load(open(os.path.join(w, f"stream-{f}.json")))["results"]
    a, b = r["raw_read_gbps"]
    print(f"{f:<8} {r['tg']['mean']:7.1f} ± {r['tg']['sd']:4.1f} {r['bytes_streamed_per_token']/1e6:9.1f} {a:10.2f} / {b:<9.2f} {r['physical_bound_tps']:12.1f} {r['tg_vs_bound']:11.2f} {r['peak_rss_bytes']/2**20:13.1f}")
print()
print("MoE fixtures, --stream-layers, tg64 token by token, expert cache capped")
print(f"{'model':<13} {'cache cap':>9} {'hit rate':>9} {'hits':>6} {'misses':>7} {'evicted':>8} {'KB read/token':>14} {'tg tok/s':>9}")
for m in ("mixtral", "qwen", "mixtral-gguf"):
    for cap in ("1", "200KB", "1MB"):
        r = json.load(open(os.path.join(w, f"moe-{m}-{cap}.json")))["results"]
        c = r["expert_cache"]
        print(f"{m:<13} {cap:>9} {r['expert_cache_hit_rate']*100:8.1f}% {c['hits']:6d} {c['misses']:7d} {c['evictions']:8d} {r['bytes_streamed_per_token']/1e3:14.1f} {r['tg']['mean']:9.1f}")
PY
