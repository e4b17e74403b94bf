#!/usr/bin/env bash
# Size and speed of the lossless tiers against the order-0 entropy of the original values, ZipNN
# and zstd -3, on the MiniLM BF16 and F32 fixtures, in one run. Prints one Markdown table per
# model; the JSON of every tpde run goes to $OUT (default: a temporary folder, named on stderr).
#
#   bash benches/entropy.sh [REPS]
#
# ZipNN (PyPI `zipnn`, pinned below) is installed into a virtual environment under
# ~/.cache/tpde-bench the first time. Every tool runs with 2 threads; speeds are original bytes
# per second of the tool's own work, warm page cache, median over REPS (default 5):
#   tpde pack / verify / unpack: the `seconds` field of `--json` (no process start-up);
#   tpde load: `tpde bench --stream-only --warm --fidelity exact`, the loader rebuilding every
#     tensor into memory with each chunk's checksum checked (what a runtime does; verify also
#     checks the BLAKE3 of every tensor and file, unpack also writes and fsyncs the file);
#   ZipNN compress / decompress: timed in-process around `compress` / `decompress`;
#   zstd -3 -T2 / zstd -d -T2: the process's wall time.
# Every decompressed or unpacked output is compared with the source, byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
fx=${TPDE_FIXTURES:-$HOME/.cache/tpde-fixtures}
out=${OUT:-$(mktemp -d -t tpde-entropy-XXXXXX)}
mkdir -p "$out"
echo "entropy bench: scratch and JSON in $out" >&2
venv=$HOME/.cache/tpde-bench/zipnn-venv
if ! "$venv/bin/python" -c "import zipnn" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "zipnn==0.5.4"
fi
command -v zstd >/dev/null || { echo "zstd not found: apt-get install zstd" >&2; exit 2; }
cargo build --release --quiet --bin tpde
tpde=$PWD/target/release/tpde
for m in all-minilm-l6-v2-bf16 all-minilm-l6-v2; do
  src=$fx/$m/model.safetensors
  [ -f "$src" ] || { echo "missing $src: run fixtures/fetch.sh" >&2; exit 2; }
done
"$venv/bin/python" - "$tpde" "$fx" "$out" "$reps" <<'PY'
import hashlib, json, math, os, platform, statistics, subprocess, sys, time
import numpy as np
from zipnn import ZipNN

tpde, fx, out, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout

def order0(values):
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())

def floats(path):
    """The file's float tensors as unsigned integers of their width, and the dtype."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    parts, dtype = [], None
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in ("BF16", "F32"):
            continue
        dtype = t["dtype"]
        a, b = t["data_offsets"]
        parts.append(np.frombuffer(raw[base + a:base + b], dtype=np.uint16 if dtype == "BF16" else np.uint32))
    return raw, np.concatenate(parts), dtype

git = run(["git", "rev-parse", "--short", "HEAD"]).strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
zstd_v = run(["zstd", "--version"]).strip()
print(f"entropy bench, git {git}, {cpu}, {os.cpu_count()} cores, {reps} reps, 2 threads, warm cache; "
      f"zipnn 0.5.4, {zstd_v}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
for m in ["all-minilm-l6-v2-bf16", "all-minilm-l6-v2"]:
    src = os.path.join(fx, m, "model.safetensors")
    raw, vals, dtype = floats(src)
    size = len(raw)
    weights = len(vals)
    bpw = lambda b: b * 8 / weights
    # Order-0 entropy of the values (BF16: of the 16-bit patterns; F32: of the high and the low
    # 16-bit halves, each order-0, summed: 32-bit patterns are nearly all distinct).
    if dtype == "BF16":
        h0 = order0(vals)
        h0_what = "order-0 of the 16-bit values"
    else:
        h0 = order0(vals >> 16) + order0(vals & 0xFFFF)
        h0_what = "order-0 of the high and low 16-bit halves"
    # tpde
    cont = os.path.join(out, m + ".tpde")
    pack_s, verify_s, unpack_s = [], [], []
    for r in range(reps):
        if os.path.exists(cont):
            os.remove(cont)
        j = json.loads(run([tpde, "--threads", "2", "pack", src, "-o", cont, "--json"]))
        pack_s.append(j["seconds"])
    hot, cold, total = j["hot_bytes"], j["cold_bytes"], j["container_bytes"]
    for r in range(reps):
        verify_s.append(json.loads(run([tpde, "--threads", "2", "verify", cont, "--json"]))["seconds"])
        dst = os.path.join(out, m + ".unpacked")
        subprocess.run(["rm", "-rf", dst], check=True)
        unpack_s.append(json.loads(run([tpde, "--threads", "2", "unpack", cont, "-o", dst, "--json"]))["seconds"])
        got = open(os.path.join(dst, "model.safetensors"), "rb").read()
        assert got == raw, f"{m}: tpde unpack differs from the source"
    j = json.loads(run([tpde, "--threads", "2", "bench", cont, "--stream-only", "--warm", "--fidelity", "exact",
                        "--reps", str(reps), "--json"]))
    load_gbps = j["results"]["effective_gbps"] * 1000
    # zstd -3
    zpath = os.path.join(out, m + ".zst")
    zc, zd = [], []
    for r in range(reps):
        t = time.perf_counter(); run(["zstd", "-3", "-T2", "-q", "-f", src, "-o", zpath]); zc.append(time.perf_counter() - t)
        t = time.perf_counter(); run(["zstd", "-d", "-T2", "-q", "-f", zpath, "-o", zpath + ".out"]); zd.append(time.perf_counter() - t)
    assert open(zpath + ".out", "rb").read() == raw, f"{m}: zstd round trip differs"
    zsize = os.path.getsize(zpath)
    # ZipNN, on the file's bytes, told the float type. Its compress rewrites the buffer it is
    # given in place (it reorders the bits there), so each rep gets a fresh copy, made untimed.
    zp = ZipNN(input_format="byte", bytearray_dtype="bfloat16" if dtype == "BF16" else "float32", threads=2)
    nc, nd = [], []
    for r in range(reps):
        buf = bytearray(raw)
        t = time.perf_counter(); c = zp.compress(buf); nc.append(time.perf_counter() - t)
        t = time.perf_counter(); d = zp.decompress(c); nd.append(time.perf_counter() - t)
    assert bytes(d) == raw, f"{m}: ZipNN round trip differs"
    nsize = len(c)
    med = statistics.median
    mbs = lambda s: size / med(s) / 1e6
    with open(os.path.join(out, m + ".json"), "w") as f:
        json.dump(dict(model=m, dtype=dtype, bytes=size, weights=weights, h0=h0, hot=hot, cold=cold, total=total,
                       zstd=zsize, zipnn=nsize, pack_s=pack_s, verify_s=verify_s, unpack_s=unpack_s,
                       zstd_c=zc, zstd_d=zd, zipnn_c=nc, zipnn_d=nd, load_mbs=load_gbps, git=git), f)
    print(f"### {m} ({dtype}, {weights} float weights, {size} bytes)\n")
    print("| what | bytes | bits / weight | × original | compress MB/s (per core) | decompress MB/s (per core) |")
    print("|---|---:|---:|---:|---:|---:|")
    w = 16 if dtype == "BF16" else 32
    print(f"| original | {size} | {bpw(size):.3f} | 1.000 | | |")
    print(f"| {h0_what} | | {h0:.3f} | {h0 / w:.4f} | | |")
    print(f"| tpde hot tier (q4 base) | {hot} | {bpw(hot):.3f} | {hot / size:.4f} | | |")
    print(f"| tpde cold tier (exact residual) | {cold} | {bpw(cold):.3f} | {cold / size:.4f} | | |")
    print(f"| **tpde container** (pack; load, verify, unpack) | {total} | {bpw(total):.3f} | **{total / size:.4f}** "
          f"| {mbs(pack_s):.0f} ({mbs(pack_s)/2:.0f}) | load {load_gbps:.0f} ({load_gbps/2:.0f}), verify {mbs(verify_s):.0f} ({mbs(verify_s)/2:.0f}), unpack {mbs(unpack_s):.0f} ({mbs(unpack_s)/2:.0f}) |")
    print(f"| ZipNN | {nsize} | {bpw(nsize):.3f} | {nsize / size:.4f} | {mbs(nc):.0f} ({mbs(nc)/2:.0f}) | {mbs(nd):.0f} ({mbs(nd)/2:.0f}) |")
    print(f"| zstd -3 | {zsize} | {bpw(zsize):.3f} | {zsize / size:.4f} | {mbs(zc):.0f} ({mbs(zc)/2:.0f}) | {mbs(zd):.0f} ({mbs(zd)/2:.0f}) |")
    print()
PY
