#!/usr/bin/env bash
# The CPU engine against llama.cpp on the same GGUF, same machine, same run.
#
#   bash benches/engine.sh [MODEL.gguf] [REPS]
#
# Packs MODEL (default: the SmolLM2-135M Q4_1 fixture), then, back to back:
#   tpde bench --fidelity base  -p 0 -n 32  and  -p 512 -n 128   (2 threads, every weight resident)
#   llama-bench -p 0 -n 32   and  -p 512 -n 128   (-t 2), when benches/llama_cpp.sh has built it
# and prints tpde ÷ llama.cpp for tg32, tg128 and pp512. Without llama.cpp it prints tpde's
# figures and says that the comparison was skipped, and why.
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures=${TPDE_FIXTURES:-$HOME/.cache/tpde-fixtures}
model=${1:-$fixtures/smollm2-135m-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf}
reps=${2:-5}
llama=${LLAMA_CPP_DIR:-/work/llama.cpp-build}/build/bin/llama-bench

cargo build --release --quiet
tpde=target/release/tpde
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$tpde pack "$model" -o "$work/model.tpde" --json > /dev/null
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; git $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty); $(date -u +%FT%TZ)"

$tpde --threads 2 bench "$work/model.tpde" --fidelity base -p 0 -n 32 --reps "$reps" --json > "$work/tg32.json"
$tpde --threads 2 bench "$work/model.tpde" --fidelity base -p 512 -n 128 --reps 3 --json > "$work/pp.json"
have_llama=0
if [ -x "$llama" ]; then
  have_llama=1
  "$llama" -m "$model" -t 2 -p 0 -n 32 -r "$reps" -o json > "$work/l_tg32.json" 2>/dev/null
  "$llama" -m "$model" -t 2 -p 512 -n 128 -r 3 -o json > "$work/l_pp.json" 2>/dev/null
  # Without weight repacking (on CPUs with AMX, repacking is what selects the AMX kernels):
  # llama.cpp's AVX-512 / AVX2 kernels on the GGUF's own layout.
  "$llama" -m "$model" -t 2 -p 0 -n 32 -r "$reps" --repack 0 -o json > "$work/l_norepack.json" 2>/dev/null
fi

python3 - "$work" "$have_llama" <<'PY'
import json, sys, os
w, have = sys.argv[1], sys.argv[2] == "1"
t32 = json.load(open(os.path.join(w, "tg32.json")))["results"]
tpp = json.load(open(os.path.join(w, "pp.json")))["results"]
rows = [("tg32", t32["tg"]), ("pp512", tpp["pp"]), ("tg128", tpp["tg"])]
ref = {}
if have:
    for f in ("l_tg32.json", "l_pp.json"):
        for r in json.load(open(os.path.join(w, f))):
            name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            ref[name] = (r["avg_ts"], r["stddev_ts"])
if have:
    for r in json.load(open(os.path.join(w, "l_norepack.json"))):
        ref["tg32 (llama.cpp --repack 0)"] = (r["avg_ts"], r["stddev_ts"])
    rows.append(("tg32 (llama.cpp --repack 0)", t32["tg"]))
print(f"{'test':<7} {'tpde tok/s':>18} {'llama.cpp tok/s':>18} {'tpde ÷ llama.cpp':>17}")
for name, m in rows:
    l = ref.get(name)
    lt = f"{l[0]:9.1f} ± {l[1]:5.1f}" if l else "—"
    ratio = f"{m['mean'] / l[0]:.2f}" if l else "—"
    print(f"{name:<7} {m['mean']:9.1f} ± {m['sd']:5.1f} {lt:>18} {ratio:>17}")
print(f"first token (pp512): {tpp['ttft_ms']:.0f} ms; load {t32['load_seconds']:.3f} s")
if not have:
    print("llama.cpp comparison skipped: no llama-bench (build it with: bash benches/llama_cpp.sh)")
PY
