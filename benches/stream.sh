#!/usr/bin/env bash
# The loader's figures of record: `tpde bench --stream-only` on the MiniLM BF16 and F32 fixtures,
# exact and base fidelity, O_DIRECT (cold by construction) and buffered with the page cache
# dropped, 2 threads, a 256 MiB budget. Prints one Markdown table; the full JSON of every run
# (audit trail included) goes to $OUT (default: a temporary folder, named on stderr).
#
#   bash benches/stream.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
fx=${TPDE_FIXTURES:-$HOME/.cache/tpde-fixtures}
out=${OUT:-$(mktemp -d -t tpde-stream-XXXXXX)}
mkdir -p "$out"
echo "stream bench: JSON in $out" >&2
cargo build --release --quiet --bin tpde
tpde=target/release/tpde
for m in all-minilm-l6-v2-bf16 all-minilm-l6-v2; do
  src=$fx/$m/model.safetensors
  [ -f "$src" ] || { echo "missing $src: run fixtures/fetch.sh" >&2; exit 2; }
  [ -f "$out/$m.tpde" ] || "$tpde" pack "$src" -o "$out/$m.tpde" --json > "$out/$m.pack.json"
  for fid in exact base; do
    for io in --direct ""; do
      tag=$m.$fid${io:+.direct}
      "$tpde" --threads 2 bench "$out/$m.tpde" --stream-only --fidelity $fid $io \
        --ram 256MiB --reps "$reps" --json > "$out/$tag.json"
    done
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
print("| model | fidelity | reads | raw GB/s (read the same way) | container read GB/s (× raw) | effective GB/s (× raw) | × disk bound | read ÷ original | bottleneck | overlap | peak RSS MiB |")
print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    if f.endswith(".pack.json"):
        continue
    r = json.load(open(f))["results"]
    model = "MiniLM BF16" if "bf16" in f else "MiniLM F32"
    print(f"| {model} | {r['fidelity']} | {'O_DIRECT' if r['direct'] else 'buffered, cache dropped'} "
          f"| {r['raw_read_gbps']:.2f} | {r['container_read_gbps']:.2f} ({r['read_vs_raw']:.2f}) "
          f"| {r['effective_gbps']:.2f} ({r['effective_vs_raw']:.2f}) | {r['effective_vs_bound']:.2f} "
          f"| {r['bytes_read']/r['original_bytes']:.3f} | {r['bottleneck']} | {r['overlap_efficiency']:.2f} "
          f"| {r['peak_rss_bytes']/2**20:.0f} |")
a = json.load(open(glob.glob(os.path.join(out, "*.direct.json"))[0]))["audit"]
e = a["environment"]
print(f"\ntpde {e['tpde_version']} ({e['git_commit']}), {e['rustc']}, {e['os']}, kernel {e['kernel']}, "
      f"{e['cpu_model']}, {e['logical_cores']}, RAM {e['ram_bytes']/2**30:.1f} GiB; {a['started']}")
PY
