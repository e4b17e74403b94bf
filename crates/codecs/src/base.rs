//! Hot-tier base codecs: `q4` and `q8` group quantizers.
//!
//! A matrix of `rows × cols` elements is quantized row by row in groups of
//! `group` consecutive elements (the last group of a row may be shorter).
//! Each group becomes one *block*: a little-endian f16 scale `d` followed by
//! the group's integer codes.
//!
//! - `q4`: codes are 4-bit, `q ∈ [-8, 7]` stored as `q + 8`, two per byte,
//!   element `2i` in the low nibble and `2i + 1` in the high nibble. `d` is
//!   the group's element of largest magnitude divided by −8, so that element
//!   maps exactly to code −8 and the full range is used.
//! - `q8`: codes are `i8` in `[-127, 127]`, `d = max|x| / 127`.
//!
//! The dequantized value of code `q` is `q × d`. Non-finite inputs do not
//! take part in choosing `d`; NaN quantizes to 0, and ±Inf to the extreme
//! codes when `d ≠ 0` (to 0 when the whole group is zero or non-finite). (The exact residual in the cold tier restores every bit pattern
//! regardless of what the base predicts.)
//!
//! [`quantize_reference`] is the plain per-element definition; [`quantize`]
//! is the fast path used by the pipeline and must agree with it bit for bit.

use crate::float::FloatDtype;
use half::f16;
pub use tpde_format::{BaseCodec, BaseLayout};

/// Plain definition of the group scale: the f16 of `m / -8` (q4) or
/// `max|x| / 127` (q8), where `m` is the finite element of largest
/// magnitude (first one on ties), clamped to the finite f16 range.
pub fn group_scale(codec: BaseCodec, values: impl Iterator<Item = f32>) -> f16 {
    let mut m = 0.0f32;
    for v in values {
        if v.is_finite() && v.abs() > m.abs() {
            m = v;
        }
    }
    let d = match codec {
        BaseCodec::Q4 => m / -8.0,
        BaseCodec::Q8 => m.abs() / 127.0,
    };
    f16::from_f32(d.clamp(-f16::MAX.to_f32(), f16::MAX.to_f32()))
}

/// Plain definition of the code of `x` under scale `d`: `x × (1/d)`
/// rounded to nearest, ties to even, clamped to the codec's range.
#[inline]
pub fn quantize_value(codec: BaseCodec, x: f32, d: f16) -> i32 {
    let d = d.to_f32();
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let r = (x * inv).round_ties_even();
    // NaN compares false on both sides and maps to 0.
    if r >= codec.q_max() as f32 {
        codec.q_max()
    } else if r <= codec.q_min() as f32 {
        codec.q_min()
    } else if r.is_nan() {
        0
    } else {
        r as i32
    }
}

/// Reads code `i` of a block payload.
#[inline]
pub fn block_code(codec: BaseCodec, payload: &[u8], i: usize) -> i32 {
    match codec {
        BaseCodec::Q4 => {
            let b = payload[i / 2];
            let nib = if i.is_multiple_of(2) {
                b & 0x0F
            } else {
                b >> 4
            };
            nib as i32 - 8
        }
        BaseCodec::Q8 => payload[i] as i8 as i32,
    }
}

/// Reads the scale of a block.
#[inline]
pub fn block_scale(block: &[u8]) -> f16 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]]))
}

/// Scalar reference quantizer: `src` holds whole rows of `dtype` elements,
/// `out` receives `rows × row_bytes` bytes.
pub fn quantize_reference(dtype: FloatDtype, layout: &BaseLayout, src: &[u8], out: &mut [u8]) {
    let rows = src.len() / dtype.width() / layout.cols;
    assert_eq!(rows * layout.cols * dtype.width(), src.len());
    assert_eq!(out.len(), rows * layout.row_bytes());
    out.fill(0);
    for r in 0..rows {
        let row_out = &mut out[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
        layout.for_each_group(|col, len, off| {
            let at = |i: usize| dtype.bits_to_f32(dtype.load_bits(src, r * layout.cols + col + i));
            let d = group_scale(layout.codec, (0..len).map(at));
            row_out[off..off + 2].copy_from_slice(&d.to_bits().to_le_bytes());
            let payload = &mut row_out[off + 2..off + layout.block_bytes(len)];
            for i in 0..len {
                let q = quantize_value(layout.codec, at(i), d);
                match layout.codec {
                    BaseCodec::Q4 => payload[i / 2] |= ((q + 8) as u8) << (4 * (i % 2)),
                    BaseCodec::Q8 => payload[i] = q as i8 as u8,
                }
            }
        });
    }
}

/// Fast quantizer (the one the pipeline uses); bit-identical to
/// [`quantize_reference`]. Widens each group to f32 once, then quantizes
/// with one reciprocal per group.
pub fn quantize(dtype: FloatDtype, layout: &BaseLayout, src: &[u8], out: &mut [u8]) {
    let w = dtype.width();
    let rows = src.len() / w / layout.cols;
    assert_eq!(rows * layout.cols * w, src.len());
    assert_eq!(out.len(), rows * layout.row_bytes());
    let rb = layout.row_bytes();
    let mut vals = vec![0f32; layout.group];
    let (qmin, qmax) = (layout.codec.q_min() as f32, layout.codec.q_max() as f32);
    let wide = layout.codec == BaseCodec::Q4
        && matches!(dtype, FloatDtype::BF16 | FloatDtype::F16 | FloatDtype::F32)
        && q4_avx512::available();
    for (r, row_out) in out.chunks_exact_mut(rb).enumerate() {
        let row_src = &src[r * layout.cols * w..(r + 1) * layout.cols * w];
        layout.for_each_group(|col, len, off| {
            if wide && len == 64 {
                // SAFETY: the features are present (`available`); the source
                // holds the group's 64 elements and the block is 34 bytes.
                unsafe {
                    q4_avx512::group64(
                        dtype,
                        &row_src[col * w..(col + 64) * w],
                        &mut row_out[off..off + 34],
                    )
                };
                return;
            }
            let vals = &mut vals[..len];
            widen_to_f32(dtype, &row_src[col * w..(col + len) * w], vals);
            let mut m = 0.0f32;
            for &v in vals.iter() {
                if v.is_finite() && v.abs() > m.abs() {
                    m = v;
                }
            }
            let d = match layout.codec {
                BaseCodec::Q4 => m / -8.0,
                BaseCodec::Q8 => m.abs() / 127.0,
            };
            let d = f16::from_f32(d.clamp(-f16::MAX.to_f32(), f16::MAX.to_f32()));
            row_out[off..off + 2].copy_from_slice(&d.to_bits().to_le_bytes());
            let df = d.to_f32();
            let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
            let payload = &mut row_out[off + 2..off + layout.block_bytes(len)];
            // Clamp first (NaN passes through and casts to 0), then round
            // to nearest even with the 1.5 × 2^23 trick, exact for |v| < 2^22.
            let q = |x: f32| -> i32 {
                let v = (x * inv).clamp(qmin, qmax);
                ((v + 12_582_912.0) - 12_582_912.0) as i32
            };
            match layout.codec {
                BaseCodec::Q4 => {
                    for (i, b) in payload.iter_mut().enumerate() {
                        let lo = (q(vals[2 * i]) + 8) as u8;
                        let hi = vals.get(2 * i + 1).map_or(0, |&x| (q(x) + 8) as u8);
                        *b = lo | (hi << 4);
                    }
                }
                BaseCodec::Q8 => {
                    for (b, &x) in payload.iter_mut().zip(vals.iter()) {
                        *b = q(x) as i8 as u8;
                    }
                }
            }
        });
    }
}

/// The q4 quantizer for one whole group of 64 BF16, F16 or F32 elements,
/// 16 at a time (AVX-512 on x86-64; elsewhere never used). Bit-identical to
/// the scalar path, which the tests compare with [`quantize_reference`].
mod q4_avx512 {
    use super::*;

    /// Whether [`group64`] may be called on this machine.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Quantizes the 64 elements of `src` (little-endian `dtype`) into the
    /// 34-byte q4 block `out`: the scale, then 32 bytes of codes.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `dtype` is BF16, F16 or F32; `src` holds 64
    /// elements and `out` 34 bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn group64(dtype: FloatDtype, src: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(src.len() >= 64 * dtype.width() && out.len() >= 34);
        let p = src.as_ptr();
        let v: [__m512; 4] = std::array::from_fn(|k| match dtype {
            FloatDtype::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(32 * k) as *const __m256i)),
                16,
            )),
            FloatDtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * k) as *const __m256i)),
            _ => _mm512_loadu_ps(p.add(64 * k) as *const f32),
        });
        // The largest finite magnitude, as the bits of |x| (ordered like the
        // values for non-negative floats); non-finite elements count as 0.
        let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
        let inf = _mm512_set1_epi32(0x7F80_0000);
        let a: [__m512i; 4] = std::array::from_fn(|k| {
            let b = _mm512_and_si512(_mm512_castps_si512(v[k]), abs_mask);
            _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(b, inf), b)
        });
        let top = _mm512_max_epu32(_mm512_max_epu32(a[0], a[1]), _mm512_max_epu32(a[2], a[3]));
        let big = _mm512_reduce_max_epu32(top);
        // m: the first element of that magnitude, with its sign; +0 when the
        // group has no finite non-zero element.
        let m = if big == 0 {
            0.0f32
        } else {
            let t = _mm512_set1_epi32(big as i32);
            let hits = (0..4).fold(0u64, |acc, k| {
                acc | (u64::from(_mm512_cmpeq_epi32_mask(a[k], t)) << (16 * k))
            });
            let i = hits.trailing_zeros() as usize;
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), v[i / 16]);
            lanes[i % 16]
        };
        let d = f16::from_f32((m / -8.0).clamp(-f16::MAX.to_f32(), f16::MAX.to_f32()));
        out[..2].copy_from_slice(&d.to_bits().to_le_bytes());
        let df = d.to_f32();
        let inv = _mm512_set1_ps(if df != 0.0 { 1.0 / df } else { 0.0 });
        let (lo, hi) = (_mm512_set1_ps(-8.0), _mm512_set1_ps(7.0));
        for (k, &x) in v.iter().enumerate() {
            // Clamp (a NaN comes out of max/min as −8 and is set to 0 after),
            // round to nearest even, add 8.
            let y = _mm512_mul_ps(x, inv);
            let nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
            let c = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
            let q = _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            let q = _mm512_add_epi32(
                _mm512_mask_mov_epi32(q, nan, _mm512_setzero_si512()),
                _mm512_set1_epi32(8),
            );
            // Codes 2i and 2i + 1 share a 64-bit lane: low nibble, high nibble.
            let pair = _mm512_or_si512(
                _mm512_and_si512(q, _mm512_set1_epi64(0x0F)),
                _mm512_and_si512(_mm512_srli_epi64(q, 28), _mm512_set1_epi64(0xF0)),
            );
            _mm_storel_epi64(
                out.as_mut_ptr().add(2 + 8 * k) as *mut __m128i,
                _mm512_cvtepi64_epi8(pair),
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn group64(_: FloatDtype, _: &[u8], _: &mut [u8]) {
        unreachable!("never available off x86-64")
    }
}

/// Widens little-endian elements of `dtype` to f32.
#[inline]
pub fn widen_to_f32(dtype: FloatDtype, src: &[u8], out: &mut [f32]) {
    match dtype {
        FloatDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        FloatDtype::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        FloatDtype::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatDtype::F64 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
    }
}

/// Dequantizes whole rows of a base to f32 (`out.len() == rows × cols`).
pub fn dequantize(layout: &BaseLayout, base: &[u8], out: &mut [f32]) {
    let rb = layout.row_bytes();
    assert_eq!(base.len() % rb, 0);
    assert_eq!(out.len(), base.len() / rb * layout.cols);
    for (row_in, row_out) in base.chunks_exact(rb).zip(out.chunks_exact_mut(layout.cols)) {
        layout.for_each_group(|col, len, off| {
            let d = block_scale(&row_in[off..]).to_f32();
            let payload = &row_in[off + 2..off + layout.block_bytes(len)];
            for i in 0..len {
                row_out[col + i] = block_code(layout.codec, payload, i) as f32 * d;
            }
        });
    }
}
