//! Dequantization of ggml tensor types (the blocks stored in GGUF files) to
//! f32.
//!
//! [`dequantize`] is the fast path, one whole block at a time in loops LLVM
//! vectorizes; [`dequantize_reference`] computes every element on its own
//! straight from the block definitions below. The two agree bit for bit on
//! every result that is not NaN (see *Exactness*), and the committed vectors
//! in `testdata/ggml/` (made by the gguf Python package) hold both to
//! llama.cpp's definition (`ggml-common.h`, `ggml-quants.c`).
//!
//! # Block layouts
//!
//! Every field is little-endian; `f16` is IEEE binary16, `f32` binary32.
//! Within a block, element `e` counts from 0; `qs`, `qh`… are byte arrays
//! and `x[i] >> k & m` reads bits of byte `i`. Codes are integers (exact in
//! f32); the formulas are f32 arithmetic, parenthesized products first.
//!
//! | type | bytes / elems | fields, in order | element `e` |
//! |------|---------------|------------------|-------------|
//! | F32  | 4 / 1   | value: f32 | the value |
//! | F16  | 2 / 1   | value: f16 | the value, widened exactly |
//! | BF16 | 2 / 1   | value: bf16 | the value (the f32 whose top 16 bits these are) |
//! | Q4_0 | 18 / 32 | `d: f16, qs[16]` | `(n(e) − 8)·d` |
//! | Q4_1 | 20 / 32 | `d: f16, m: f16, qs[16]` | `n(e)·d + m` |
//! | Q5_0 | 22 / 32 | `d: f16, qh: u32, qs[16]` | `(n5(e) − 16)·d` |
//! | Q5_1 | 24 / 32 | `d: f16, m: f16, qh: u32, qs[16]` | `n5(e)·d + m` |
//! | Q8_0 | 34 / 32 | `d: f16, qs: i8[32]` | `qs[e]·d` |
//! | Q8_1 | 36 / 32 | `d: f16, s: f16 (= d·Σqs, unused), qs: i8[32]` | `qs[e]·d` |
//! | Q2_K | 84 / 256 | `scales[16], qs[64], d: f16, dmin: f16` | `(d·(sc & 15))·q2(e) − dmin·(sc >> 4)`, `sc = scales[e/16]` |
//! | Q3_K | 110 / 256 | `hmask[32], qs[64], scales[12], d: f16` | `(d·(s6(e/16) − 32))·(q2(e) − 4 + 4·(hmask[e%32] >> (e/32) & 1))` |
//! | Q4_K | 144 / 256 | `d: f16, dmin: f16, scales[12], qs[128]` | `(d·sc(s))·q4(e) − dmin·mn(s)`, `s = e/32` |
//! | Q5_K | 176 / 256 | `d: f16, dmin: f16, scales[12], qh[32], qs[128]` | `(d·sc(s))·(q4(e) + 16·(qh[e%32] >> s & 1)) − dmin·mn(s)` |
//! | Q6_K | 210 / 256 | `ql[128], qh[64], scales: i8[16], d: f16` | `(d·scales[e/16])·q6(e)` |
//! | Q8_K | 292 / 256 | `d: f32, qs: i8[256], bsums: i16[16] (unused)` | `qs[e]·d` |
//!
//! where
//! - `n(e)` (the `_0`/`_1` types) is the low nibble of `qs[e]` for `e < 16`
//!   and the high nibble of `qs[e − 16]` otherwise, and
//!   `n5(e) = n(e) + 16·(qh >> e & 1)` (bit `e` of `qh` is bit 4 of the code);
//! - `q2(e) = qs[32·(e/128) + e%32] >> 2·((e%128)/32) & 3` (Q2_K, Q3_K);
//! - `s6(j)` (Q3_K) is the 6-bit scale `j`: low 4 bits
//!   `scales[j%8] >> 4·(j/8) & 15`, high 2 bits `scales[8 + j%4] >> 2·(j/4) & 3`;
//! - `sc(s)`, `mn(s)` (Q4_K, Q5_K) are 6-bit: for `s < 4`,
//!   `scales[s] & 63` and `scales[s+4] & 63`; for `s ≥ 4`,
//!   `(scales[s+4] & 15) + 16·(scales[s−4] >> 6)` and
//!   `(scales[s+4] >> 4) + 16·(scales[s] >> 6)`;
//! - `q4(e) = qs[32·(e/64) + e%32] >> 4·(s%2) & 15` (Q4_K, Q5_K);
//! - `q6(e)` (Q6_K), with `h = e/128`, `g = (e%128)/32`, `l = e%32`:
//!   `(ql[64h + 32·(g%2) + l] >> 4·(g/2) & 15) + 16·(qh[32h + l] >> 2g & 3) − 32`.
//!
//! # Exactness
//!
//! Each result is the exact value of its formula rounded to f32 at most
//! once. An f16 scale has 11 significant bits, so its product with a
//! sub-scale and a code fits f32's 24-bit significand and is exact (the
//! largest, Q6_K's, is at most 2047·128·32 < 2²⁴ units of the scale's last
//! place; f16 subnormals included). What remains is one rounding: the final
//! add or subtract of Q4_1, Q5_1, Q2_K, Q4_K and Q5_K, and the product of
//! Q8_K's f32 scale with its code. F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q8_1,
//! Q3_K and Q6_K never round at all.
//!
//! So results do not depend on how the products are grouped, or on whether
//! the last multiply and add are fused: [`dequantize`], [`dequantize_reference`],
//! llama.cpp's C (with or without FMA contraction) and gguf-py's numpy agree
//! bit for bit, signed zeros and infinities included (`tests/ggml.rs` checks
//! the committed vectors at 0 ulp). Both paths here also take the same
//! operations in the same order (scale products first), as the C does.
//!
//! The one exception is NaN payloads. Rust does not specify which NaN an
//! arithmetic operation returns, so where a scale is NaN or infinite (an
//! infinite one times a zero code gives NaN), the result is only guaranteed
//! to be *a* NaN. The plain types involve no arithmetic and keep every bit,
//! NaN payloads included; an f16 signalling NaN stays signalling, as in
//! numpy, whereas ggml's F16C conversion would quiet it.

use crate::CodecError;
use tpde_format::ggml::GgmlType;

/// The types [`dequantize`] and [`dequantize_reference`] handle.
const SUPPORTED: [GgmlType; 15] = {
    use GgmlType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
    ]
};

/// Whether [`dequantize`] and [`dequantize_reference`] handle `ty`.
pub fn supports(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

fn unsupported(ty: GgmlType) -> CodecError {
    CodecError::Shape(format!("ggml {}: no dequantizer for this type", ty.name()))
}

/// Checks that `ty` is supported, `data` is whole blocks and `out` holds
/// exactly their elements; returns (bytes per block, elements per block).
fn check(ty: GgmlType, data: &[u8], out: &[f32]) -> Result<(usize, usize), CodecError> {
    if !supports(ty) {
        return Err(unsupported(ty));
    }
    // Table values are at most a few hundred: they fit any usize.
    let block_bytes = ty.block_bytes() as usize;
    let block_elems = ty.block_elems() as usize;
    if !data.len().is_multiple_of(block_bytes) {
        return Err(CodecError::Shape(format!(
            "ggml {}: {} bytes is not a whole number of {block_bytes}-byte blocks",
            ty.name(),
            data.len()
        )));
    }
    let blocks = data.len() / block_bytes;
    let elems = blocks.checked_mul(block_elems).ok_or_else(|| {
        CodecError::Shape(format!(
            "ggml {}: {blocks} blocks overflow the element count",
            ty.name()
        ))
    })?;
    if out.len() != elems {
        return Err(CodecError::Shape(format!(
            "ggml {}: {blocks} blocks hold {elems} elements, out has {}",
            ty.name(),
            out.len()
        )));
    }
    Ok((block_bytes, block_elems))
}

// ---------------------------------------------------------------------------
// Reference: one element at a time, straight from the table in the module
// docs.
// ---------------------------------------------------------------------------

/// The value of an f16 bit pattern, from its definition:
/// `(−1)^sign × 2^(exp−15) × (1 + man/1024)`, subnormals
/// `(−1)^sign × 2^−14 × man/1024`; infinities and NaNs keep their bits.
fn f16_value_reference(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1F);
    let man = u32::from(bits & 0x3FF);
    // 2^k for the k used below (−24 ≤ k ≤ 5): exact either way.
    let pow2 = |k: i32| {
        if k >= 0 {
            (1u32 << k) as f32
        } else {
            1.0 / (1u32 << -k) as f32
        }
    };
    match exp {
        0x1F => f32::from_bits((u32::from(bits & 0x8000) << 16) | 0x7F80_0000 | (man << 13)),
        0 => sign * (man as f32 * pow2(-24)),
        _ => sign * ((1024 + man) as f32 * pow2(exp - 25)),
    }
}

fn f16_at_reference(b: &[u8], at: usize) -> f32 {
    f16_value_reference(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Q4_K / Q5_K 6-bit scale and min of sub-block `s` (0..8).
fn scale_min_k4_reference(scales: &[u8], s: usize) -> (u8, u8) {
    if s < 4 {
        (scales[s] & 63, scales[s + 4] & 63)
    } else {
        (
            (scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4),
            (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4),
        )
    }
}

/// Nibble `n(e)` of the `_0`/`_1` types.
fn nibble_reference(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 15
    } else {
        qs[e - 16] >> 4
    }
}

/// `q2(e)` of Q2_K and Q3_K.
fn crumb_reference(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// Element `e` of `block` (exactly one block of `ty`).
fn element_reference(ty: GgmlType, b: &[u8], e: usize) -> f32 {
    use GgmlType::*;
    match ty {
        F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => f16_at_reference(b, 0),
        BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        Q4_0 => {
            let d = f16_at_reference(b, 0);
            (i32::from(nibble_reference(&b[2..], e)) - 8) as f32 * d
        }
        Q4_1 => {
            let (d, m) = (f16_at_reference(b, 0), f16_at_reference(b, 2));
            f32::from(nibble_reference(&b[4..], e)) * d + m
        }
        Q5_0 => {
            let d = f16_at_reference(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let q = u32::from(nibble_reference(&b[6..], e)) | ((qh >> e) & 1) << 4;
            (q as i32 - 16) as f32 * d
        }
        Q5_1 => {
            let (d, m) = (f16_at_reference(b, 0), f16_at_reference(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let q = u32::from(nibble_reference(&b[8..], e)) | ((qh >> e) & 1) << 4;
            q as f32 * d + m
        }
        Q8_0 => f32::from(b[2 + e] as i8) * f16_at_reference(b, 0),
        Q8_1 => f32::from(b[4 + e] as i8) * f16_at_reference(b, 0),
        Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at_reference(b, 80), f16_at_reference(b, 82));
            let sc = scales[e / 16];
            (d * f32::from(sc & 15)) * f32::from(crumb_reference(qs, e)) - dmin * f32::from(sc >> 4)
        }
        Q3_K => {
            let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = f16_at_reference(b, 108);
            let j = e / 16;
            let low = (scales[j % 8] >> (4 * (j / 8))) & 15;
            let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
            let sc = i32::from(low | high << 4) - 32;
            let hbit = i32::from((hmask[e % 32] >> (e / 32)) & 1);
            let q = i32::from(crumb_reference(qs, e)) - 4 + 4 * hbit;
            (d * sc as f32) * q as f32
        }
        Q4_K | Q5_K => {
            let (d, dmin) = (f16_at_reference(b, 0), f16_at_reference(b, 2));
            let scales = &b[4..16];
            let qs = if ty == Q4_K { &b[16..144] } else { &b[48..176] };
            let s = e / 32;
            let (sc, mn) = scale_min_k4_reference(scales, s);
            let mut q = (qs[32 * (e / 64) + e % 32] >> (4 * (s % 2))) & 15;
            if ty == Q5_K {
                let qh = &b[16..48];
                q |= ((qh[e % 32] >> s) & 1) << 4;
            }
            (d * f32::from(sc)) * f32::from(q) - dmin * f32::from(mn)
        }
        Q6_K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at_reference(b, 208);
            let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = (ql[64 * h + 32 * (g % 2) + l] >> (4 * (g / 2))) & 15;
            let high = (qh[32 * h + l] >> (2 * g)) & 3;
            let q = i32::from(low | high << 4) - 32;
            (d * f32::from(scales[e / 16] as i8)) * q as f32
        }
        Q8_K => {
            let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            f32::from(b[4 + e] as i8) * d
        }
        // `check` admits only the types above.
        _ => f32::NAN,
    }
}

/// Plain per-element reference of [`dequantize`]: every element computed
/// on its own from the block definitions in the module docs. Slow.
pub fn dequantize_reference(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    let (block_bytes, block_elems) = check(ty, data, out)?;
    for (i, y) in out.iter_mut().enumerate() {
        let block = &data[i / block_elems * block_bytes..][..block_bytes];
        *y = element_reference(ty, block, i % block_elems);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Fast path: a block at a time, scales decoded once per block, inner loops
// over 16 or 32 elements with per-loop constants that LLVM vectorizes.
// ---------------------------------------------------------------------------

/// Exact f16 → f32 widening by bit manipulation, branch-free (selects
/// only): normal numbers, infinities and NaNs shift into place and rebias
/// the exponent (by 112, or to 255 for infinities and NaNs, which keep sign
/// and payload; signalling NaNs are not quieted); subnormals are
/// `man × 2^−24`, exact in f32. Equal bit for bit to [`f16_value_reference`]
/// on all 65536 patterns (tested).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // `as i32` (em < 2^15): signed int → float is one SSE2 instruction.
    let subnormal = ((em as i32) as f32 * (1.0 / 16_777_216.0)).to_bits();
    let rebias = if em >= 0x7C00 {
        (0xFF - 0x1F) << 23
    } else {
        (127 - 15) << 23
    };
    let magnitude = if em < 0x0400 {
        subnormal
    } else {
        (em << 13) + rebias
    };
    f32::from_bits(sign | magnitude)
}

/// F16 elements to f32, 16 at a time (gathering the halves into an array
/// first lets LLVM vectorize the widening), then the tail.
fn f16_run(data: &[u8], out: &mut [f32]) {
    let mut bytes = data.chunks_exact(32);
    let mut ys = out.chunks_exact_mut(16);
    for (c, y) in (&mut bytes).zip(&mut ys) {
        let h: [u16; 16] = std::array::from_fn(|i| u16::from_le_bytes([c[2 * i], c[2 * i + 1]]));
        for (y, h) in y.iter_mut().zip(h) {
            *y = f16_to_f32(h);
        }
    }
    for (y, c) in ys
        .into_remainder()
        .iter_mut()
        .zip(bytes.remainder().chunks_exact(2))
    {
        *y = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// `N` bytes of `b` from `at`, as an array reference (a constant-sized
/// window into a fixed-size block, so the bounds are known at compile time).
#[inline(always)]
fn window<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    b[at..at + N]
        .try_into()
        .expect("window lies inside its block")
}

/// Runs `f` on every (block, output) pair. `check` has matched the sizes.
#[inline(always)]
fn each_block<const B: usize, const E: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; E]),
) {
    for (b, y) in data.chunks_exact(B).zip(out.chunks_exact_mut(E)) {
        f(
            b.try_into().expect("chunks_exact yields B bytes"),
            y.try_into().expect("chunks_exact_mut yields E elements"),
        );
    }
}

/// Dequantizes `data` (whole blocks of `ty`) into `out` (len = elements).
/// Errors (no panic) if `ty` is not supported, or sizes disagree.
/// Bit-identical to [`dequantize_reference`] (see *Exactness* above).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    check(ty, data, out)?;
    use GgmlType::*;
    match ty {
        F32 => {
            for (y, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F16 => f16_run(data, out),
        BF16 => {
            for (y, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        Q4_0 => each_block::<18, 32>(data, out, q4_0_block),
        Q4_1 => each_block::<20, 32>(data, out, q4_1_block),
        Q5_0 => each_block::<22, 32>(data, out, q5_0_block),
        Q5_1 => each_block::<24, 32>(data, out, q5_1_block),
        Q8_0 => each_block::<34, 32>(data, out, |b, y| q8_block(f16_at(b, 0), window(b, 2), y)),
        Q8_1 => each_block::<36, 32>(data, out, |b, y| q8_block(f16_at(b, 0), window(b, 4), y)),
        Q2_K => each_block::<84, 256>(data, out, q2_k_block),
        Q3_K => each_block::<110, 256>(data, out, q3_k_block),
        Q4_K => each_block::<144, 256>(data, out, q4_k_block),
        Q5_K => each_block::<176, 256>(data, out, q5_k_block),
        Q6_K => each_block::<210, 256>(data, out, q6_k_block),
        Q8_K => each_block::<292, 256>(data, out, |b, y| {
            q8_block(f32::from_le_bytes(*window(b, 0)), window(b, 4), y)
        }),
        _ => return Err(unsupported(ty)),
    }
    Ok(())
}

fn q4_0_block(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs: &[u8; 16] = window(b, 2);
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
        *l = (i32::from(q & 15) - 8) as f32 * d;
        *h = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

fn q4_1_block(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs: &[u8; 16] = window(b, 4);
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
        *l = f32::from(q & 15) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

/// Bit `j` of the Q5_0 / Q5_1 `qh` word, as the code's bit 4 (16 or 0).
/// A mask from a table rather than `qh >> j`: SSE2 has no per-lane shift.
#[inline(always)]
fn high_bit(qh: u32, j: usize) -> i32 {
    const BIT: [u32; 32] = {
        let mut t = [0u32; 32];
        let mut j = 0;
        while j < 32 {
            t[j] = 1 << j;
            j += 1;
        }
        t
    };
    if qh & BIT[j] != 0 {
        16
    } else {
        0
    }
}

fn q5_0_block(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes(*window(b, 2));
    let qs: &[u8; 16] = window(b, 6);
    for j in 0..16 {
        let lo = i32::from(qs[j] & 15) | high_bit(qh, j);
        let hi = i32::from(qs[j] >> 4) | high_bit(qh, j + 16);
        y[j] = (lo - 16) as f32 * d;
        y[j + 16] = (hi - 16) as f32 * d;
    }
}

fn q5_1_block(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes(*window(b, 4));
    let qs: &[u8; 16] = window(b, 8);
    for j in 0..16 {
        let lo = i32::from(qs[j] & 15) | high_bit(qh, j);
        let hi = i32::from(qs[j] >> 4) | high_bit(qh, j + 16);
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

/// Q8_0, Q8_1, Q8_K: `qs[e]·d`.
#[inline(always)]
fn q8_block<const E: usize>(d: f32, qs: &[u8; E], y: &mut [f32; E]) {
    for (y, &q) in y.iter_mut().zip(qs) {
        *y = f32::from(q as i8) * d;
    }
}

fn q2_k_block(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales: &[u8; 16] = window(b, 0);
    let qs: &[u8; 64] = window(b, 16);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    // Sub-block s = elements 16s..16s+16: bytes qs[32(s/8) + 16(s%2)..][..16],
    // bit pair 2·((s%8)/2).
    for (s, ys) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * f32::from(scales[s] & 15);
        let ml = dmin * f32::from(scales[s] >> 4);
        let shift = 2 * ((s % 8) / 2);
        let q: &[u8; 16] = window(qs, 32 * (s / 8) + 16 * (s % 2));
        for (y, &q) in ys.iter_mut().zip(q) {
            *y = dl * f32::from((q >> shift) & 3) - ml;
        }
    }
}

fn q3_k_block(b: &[u8; 110], y: &mut [f32; 256]) {
    let hmask: &[u8; 32] = window(b, 0);
    let qs: &[u8; 64] = window(b, 32);
    let scales: &[u8; 12] = window(b, 96);
    let d = f16_at(b, 108);
    for (s, ys) in y.chunks_exact_mut(16).enumerate() {
        let low = (scales[s % 8] >> (4 * (s / 8))) & 15;
        let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
        let dl = d * (i32::from(low | high << 4) - 32) as f32;
        let shift = 2 * ((s % 8) / 2);
        let hbit = s / 2;
        let q: &[u8; 16] = window(qs, 32 * (s / 8) + 16 * (s % 2));
        let hm: &[u8; 16] = window(hmask, 16 * (s % 2));
        for ((y, &q), &hm) in ys.iter_mut().zip(q).zip(hm) {
            let v = i32::from((q >> shift) & 3) - 4 + 4 * i32::from((hm >> hbit) & 1);
            *y = dl * v as f32;
        }
    }
}

/// The 8 (scale, min) pairs of a Q4_K / Q5_K block, as f32 products with
/// the block's `d` and `dmin`.
#[inline(always)]
fn k4_scales(d: f32, dmin: f32, scales: &[u8; 12]) -> ([f32; 8], [f32; 8]) {
    let mut ds = [0f32; 8];
    let mut ms = [0f32; 8];
    for s in 0..8 {
        let (sc, mn) = if s < 4 {
            (scales[s] & 63, scales[s + 4] & 63)
        } else {
            (
                (scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4),
                (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4),
            )
        };
        ds[s] = d * f32::from(sc);
        ms[s] = dmin * f32::from(mn);
    }
    (ds, ms)
}

fn q4_k_block(b: &[u8; 144], y: &mut [f32; 256]) {
    let (ds, ms) = k4_scales(f16_at(b, 0), f16_at(b, 2), window(b, 4));
    let qs: &[u8; 128] = window(b, 16);
    // 64 elements per 32 bytes: low nibbles are sub-block 2c, high 2c + 1.
    for (c, yc) in y.chunks_exact_mut(64).enumerate() {
        let q: &[u8; 32] = window(qs, 32 * c);
        let (lo, hi) = yc.split_at_mut(32);
        let (d0, m0, d1, m1) = (ds[2 * c], ms[2 * c], ds[2 * c + 1], ms[2 * c + 1]);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
            *l = d0 * f32::from(q & 15) - m0;
            *h = d1 * f32::from(q >> 4) - m1;
        }
    }
}

fn q5_k_block(b: &[u8; 176], y: &mut [f32; 256]) {
    let (ds, ms) = k4_scales(f16_at(b, 0), f16_at(b, 2), window(b, 4));
    let qh: &[u8; 32] = window(b, 16);
    let qs: &[u8; 128] = window(b, 48);
    for (c, yc) in y.chunks_exact_mut(64).enumerate() {
        let q: &[u8; 32] = window(qs, 32 * c);
        let (lo, hi) = yc.split_at_mut(32);
        let (s0, s1) = (2 * c, 2 * c + 1);
        let (d0, m0, d1, m1) = (ds[s0], ms[s0], ds[s1], ms[s1]);
        for (((l, h), &q), &qh) in lo.iter_mut().zip(hi.iter_mut()).zip(q).zip(qh) {
            let ql = (q & 15) | ((qh >> s0) & 1) << 4;
            let qu = (q >> 4) | ((qh >> s1) & 1) << 4;
            *l = d0 * f32::from(ql) - m0;
            *h = d1 * f32::from(qu) - m1;
        }
    }
}

fn q6_k_block(b: &[u8; 210], y: &mut [f32; 256]) {
    let ql: &[u8; 128] = window(b, 0);
    let qh: &[u8; 64] = window(b, 128);
    let scales: &[u8; 16] = window(b, 192);
    let d = f16_at(b, 208);
    // Sub-block s: half h = s/8, quarter g = (s%8)/2, first byte l0 = 16(s%2).
    for (s, ys) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * f32::from(scales[s] as i8);
        let (h, g, l0) = (s / 8, (s % 8) / 2, 16 * (s % 2));
        let low: &[u8; 16] = window(ql, 64 * h + 32 * (g % 2) + l0);
        let high: &[u8; 16] = window(qh, 32 * h + l0);
        let (lshift, hshift) = (4 * (g / 2), 2 * g);
        for ((y, &lo), &hi) in ys.iter_mut().zip(low).zip(high) {
            let q = ((lo >> lshift) & 15) | ((hi >> hshift) & 3) << 4;
            *y = dl * (i32::from(q) - 32) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_is_exact_on_every_pattern() {
        for bits in 0..=u16::MAX {
            let fast = f16_to_f32(bits);
            let reference = f16_value_reference(bits);
            assert_eq!(fast.to_bits(), reference.to_bits(), "{bits:#06x}");
            let by_half = half::f16::from_bits(bits).to_f32();
            if by_half.is_nan() {
                // `half` (and F16C) quiet signalling NaNs; we keep them.
                assert!(fast.is_nan(), "{bits:#06x}");
                assert_eq!(
                    fast.to_bits() | 0x0040_0000,
                    by_half.to_bits(),
                    "{bits:#06x}"
                );
            } else {
                assert_eq!(fast.to_bits(), by_half.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn block_sizes_match_the_format_table() {
        use GgmlType::*;
        let sizes = [
            (F32, 4, 1),
            (F16, 2, 1),
            (BF16, 2, 1),
            (Q4_0, 18, 32),
            (Q4_1, 20, 32),
            (Q5_0, 22, 32),
            (Q5_1, 24, 32),
            (Q8_0, 34, 32),
            (Q8_1, 36, 32),
            (Q2_K, 84, 256),
            (Q3_K, 110, 256),
            (Q4_K, 144, 256),
            (Q5_K, 176, 256),
            (Q6_K, 210, 256),
            (Q8_K, 292, 256),
        ];
        for (ty, bytes, elems) in sizes {
            assert!(supports(ty));
            assert_eq!(
                (ty.block_bytes(), ty.block_elems()),
                (bytes, elems),
                "{ty:?}"
            );
        }
        assert_eq!(
            GgmlType::all().filter(|&t| supports(t)).count(),
            sizes.len()
        );
    }
}
