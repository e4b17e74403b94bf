#!/usr/bin/env python3
"""Test vectors for tpde-codecs' ggml dequantizers (crates/codecs/src/ggml.rs).

For every type the Rust side supports, writes deterministic blocks to
<TYPE>.bin and what the gguf Python package (llama.cpp's gguf-py) dequantizes
them to, as little-endian f32, to <TYPE>.f32; vectors.json lists the files,
their sha256, the block counts and the versions used.

Blocks are random bytes (every code and packed sub-scale pattern occurs)
with the f16/f32 scale fields set to finite, weight-like values, plus edge
blocks per type: zero scales, negative scales, all code bytes 0x00 / 0xFF /
0x80 (minimum and maximum codes, signed and unsigned), subnormal scales, and
the largest finite f16 scales.

gguf 0.19.0 has no dequantizer for Q8_0's siblings Q8_1 and Q8_K (llama.cpp
uses them only as the other operand of dot products); for those two this
script computes `qs[e] * d` in numpy itself (see `dequantize_q8`), and
vectors.json says so in "reference". gguf 0.19.0 also gives Q8_1 the
stale size 40 bytes (f32 d and s, ggml's layout before 2023); ggml-common.h
now has two f16 (36 bytes), which is what SIZES below and the Rust side use.

Regenerate:  pip install gguf==0.19.0 numpy==2.4.6 && python3 gen_vectors.py
"""

GGUF_VERSION = "0.19.0"
NUMPY_VERSION = "2.4.6"

import sys
from importlib.metadata import PackageNotFoundError, version

for _pkg, _want in (("gguf", GGUF_VERSION), ("numpy", NUMPY_VERSION)):
    try:
        _got = version(_pkg)
    except PackageNotFoundError:
        _got = "none"
    if _got != _want:
        sys.exit(
            f"gen_vectors.py: needs {_pkg}=={_want}, found {_got}; "
            f"run: pip install gguf=={GGUF_VERSION} numpy=={NUMPY_VERSION}"
        )

import hashlib
import json
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

SEED = 20250917
OUT = Path(__file__).resolve().parent

# (elements, bytes) per block, from llama.cpp's ggml/src/ggml-common.h.
SIZES = {
    T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2),
    T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24),
    T.Q8_0: (32, 34), T.Q8_1: (32, 36),
    T.Q2_K: (256, 84), T.Q3_K: (256, 110), T.Q4_K: (256, 144),
    T.Q5_K: (256, 176), T.Q6_K: (256, 210), T.Q8_K: (256, 292),
}
# Where gguf's GGML_QUANT_SIZES disagrees with ggml-common.h (checked below).
STALE_IN_GGUF = {T.Q8_1: (32, 40)}
for _t, _size in SIZES.items():
    assert GGML_QUANT_SIZES[_t] == STALE_IN_GGUF.get(_t, _size), (_t.name, GGML_QUANT_SIZES[_t])

# Per type: offsets of its scale fields as (offset, "f16" | "f32"), and the
# number of random blocks besides the edge blocks.
SCALES = {
    T.Q4_0: [(0, "f16")],
    T.Q4_1: [(0, "f16"), (2, "f16")],  # d, m
    T.Q5_0: [(0, "f16")],
    T.Q5_1: [(0, "f16"), (2, "f16")],  # d, m
    T.Q8_0: [(0, "f16")],
    T.Q8_1: [(0, "f16")],  # d; s at 2 is derived (set_derived)
    T.Q2_K: [(80, "f16"), (82, "f16")],  # d, dmin
    T.Q3_K: [(108, "f16")],
    T.Q4_K: [(0, "f16"), (2, "f16")],  # d, dmin
    T.Q5_K: [(0, "f16"), (2, "f16")],  # d, dmin
    T.Q6_K: [(208, "f16")],
    T.Q8_K: [(0, "f32")],  # d; bsums at 260 are derived (set_derived)
}
RANDOM_BLOCKS_SMALL = 9  # 32-element types: 16 blocks in all
RANDOM_BLOCKS_K = 3  # 256-element types: 10 blocks in all

# The ggml-quants.c types that gguf-py cannot dequantize.
OWN_REFERENCE = {T.Q8_1: (4, 32), T.Q8_K: (4, 256)}  # (offset of qs, count)


def put(block: np.ndarray, offset: int, kind: str, value: float) -> None:
    dtype = "<f2" if kind == "f16" else "<f4"
    raw = np.array([value], dtype=dtype).view(np.uint8)
    block[offset : offset + raw.size] = raw


def put_bits16(block: np.ndarray, offset: int, bits: int) -> None:
    block[offset : offset + 2] = np.array([bits], dtype="<u2").view(np.uint8)


def set_derived(qtype: T, block: np.ndarray) -> None:
    """Fields that dequantization ignores, filled in as a quantizer would."""
    if qtype == T.Q8_1:
        d = block[0:2].view("<f2").astype(np.float32)[0]
        qsum = block[4:36].view(np.int8).astype(np.float32).sum()
        put(block, 2, "f16", d * qsum)
    elif qtype == T.Q8_K:
        qs = block[4:260].view(np.int8).astype(np.int16).reshape(16, 16)
        block[260:292] = qs.sum(axis=1).astype("<i2").view(np.uint8)


def blocks_for(qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    _, type_size = SIZES[qtype]
    fields = SCALES[qtype]
    blocks, kinds = [], []

    def random_codes() -> np.ndarray:
        return rng.integers(0, 256, size=type_size, dtype=np.uint8)

    def weight_like() -> float:
        # |scale| log-uniform in [2^-14, 2^-2]: the range real files use.
        return float(rng.choice([-1.0, 1.0]) * 2.0 ** rng.uniform(-14, -2))

    def add(kind: str, block: np.ndarray) -> None:
        set_derived(qtype, block)
        blocks.append(block)
        kinds.append(kind)

    n_random = RANDOM_BLOCKS_K if SIZES[qtype][0] == 256 else RANDOM_BLOCKS_SMALL
    for _ in range(n_random):
        b = random_codes()
        for off, kind in fields:
            put(b, off, kind, weight_like())
        add("random", b)

    b = random_codes()
    for off, kind in fields:
        put(b, off, kind, 0.0)
    add("zero-scales", b)

    b = random_codes()
    for off, kind in fields:
        put(b, off, kind, -abs(weight_like()))
    add("negative-scales", b)

    for fill in (0x00, 0xFF, 0x80):
        b = np.full(type_size, fill, dtype=np.uint8)
        for off, kind in fields:
            put(b, off, kind, abs(weight_like()))
        add(f"codes-0x{fill:02x}", b)

    b = random_codes()
    for i, (off, kind) in enumerate(fields):
        if kind == "f16":
            put_bits16(b, off, (0x0001, 0x83FF)[i % 2])  # smallest, -largest subnormal
        else:
            put(b, off, kind, 1e-40)  # an f32 subnormal
    add("subnormal-scales", b)

    b = random_codes()
    for i, (off, kind) in enumerate(fields):
        put(b, off, kind, (65504.0, -65504.0)[i % 2] if kind == "f16" else 3.0e38)
    add("max-scales", b)

    return np.concatenate(blocks), kinds


def plain_values(qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of F32 / F16 / BF16 values: every special pattern, then
    random bit patterns (F16, BF16) or weight-like values (F32)."""
    if qtype == T.F32:
        specials = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000,
                    0xFFC00000, 0x7F800001, 0x7FA12345, 0xFFFFFFFF, 0x00000001,
                    0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000]
        weights = (rng.standard_normal(256 - len(specials)) * 0.02).astype(np.float32)
        bits = np.concatenate([np.array(specials, dtype=np.uint32), weights.view(np.uint32)])
        return bits.astype("<u4").view(np.uint8)
    specials_16 = {
        T.F16: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7D23,
                0xFFFF, 0x0001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0x3555],
        T.BF16: [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FA1,
                 0xFFFF, 0x0001, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0x3EAB],
    }[qtype]
    rand = rng.integers(0, 1 << 16, size=256 - len(specials_16), dtype=np.uint16)
    bits = np.concatenate([np.array(specials_16, dtype=np.uint16), rand])
    return bits.astype("<u2").view(np.uint8)


def dequantize_q8(qtype: T, data: np.ndarray) -> np.ndarray:
    """Q8_1 / Q8_K, which gguf-py lacks: y[e] = qs[e] * d, one f32 multiply
    (ggml-quants.c: dequantize_row_q8_K; Q8_1 like Q8_0 with a second f16)."""
    _, type_size = SIZES[qtype]
    qs_at, n = OWN_REFERENCE[qtype]
    blocks = data.reshape(-1, type_size)
    if qtype == T.Q8_K:
        d = blocks[:, 0:4].copy().view("<f4").astype(np.float32)
    else:
        d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    qs = blocks[:, qs_at : qs_at + n].copy().view(np.int8).astype(np.float32)
    return (qs * d).astype(np.float32).reshape(-1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    # Overflow to inf (the max-scales blocks) is intended.
    np.seterr(over="ignore")
    rng = np.random.default_rng(SEED)
    order = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q8_1,
             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]
    entries = []
    for qtype in order:
        block_size, type_size = SIZES[qtype]
        if qtype in (T.F32, T.F16, T.BF16):
            data, kinds = plain_values(qtype, rng), None
        else:
            data, kinds = blocks_for(qtype, rng)
        assert data.dtype == np.uint8 and data.size % type_size == 0
        n_blocks = data.size // type_size

        if qtype in OWN_REFERENCE:
            try:
                dequantize(data, qtype)
            except NotImplementedError:
                pass
            else:
                sys.exit(f"gguf now dequantizes {qtype.name}: use it instead of dequantize_q8")
            values, reference = dequantize_q8(qtype, data), "gen_vectors.py dequantize_q8 (numpy; gguf has none)"
        else:
            values, reference = dequantize(data, qtype), "gguf.quants.dequantize"
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        assert values.size == n_blocks * block_size, (qtype.name, values.size)

        bin_path, f32_path = OUT / f"{qtype.name}.bin", OUT / f"{qtype.name}.f32"
        bin_path.write_bytes(data.tobytes())
        f32_path.write_bytes(values.astype("<f4").tobytes())
        entry = {
            "type": qtype.name,
            "blocks": n_blocks,
            "elements": int(values.size),
            "bin": bin_path.name,
            "bin_sha256": sha256(bin_path),
            "f32": f32_path.name,
            "f32_sha256": sha256(f32_path),
            "reference": reference,
        }
        if kinds is not None:
            entry["block_kinds"] = kinds
        entries.append(entry)

    manifest = {
        "generator": "gen_vectors.py",
        "seed": SEED,
        "gguf": GGUF_VERSION,
        "numpy": NUMPY_VERSION,
        "types": entries,
    }
    (OUT / "vectors.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"wrote {len(entries)} types to {OUT} ({total} bytes in the folder)")


if __name__ == "__main__":
    main()
