//! Matrix products of the forward pass.
//!
//! A weight matrix is `rows × cols`, row-major, in one of the formats
//! below. Products are `out[t][r] = Σ_c W[r][c] · x[t][c]` for a batch of
//! `n` input vectors. For quantized weights the inputs are first quantized
//! to 8 bits in blocks of 32 ([`QuantizedActs`]), so that each block's dot
//! product is an exact integer sum, scaled once.
//!
//! Every kernel has a plain scalar reference (`*_reference`); the fast paths
//! (AVX2 on x86-64, chosen at run time) are tested against it.
//!
//! Block formats (little-endian, 32 weights per block, as in GGUF):
//! - `Q8_0`: f16 scale `d`, 32 × i8 `q`; weight = `d·q`.
//! - `Q4_0`: f16 `d`, 16 bytes of nibbles (low nibbles are weights 0–15,
//!   high nibbles 16–31); weight = `d·(q − 8)`.
//! - `Q4_1`: f16 `d`, f16 `m`, 16 bytes of nibbles as Q4_0; weight = `d·q + m`.

use crate::team::{self, Team};
use half::f16;
use std::sync::Arc;

/// Weights per quantization block.
pub const QK: usize = 32;

/// The element format of a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F32,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl WeightType {
    /// Bytes of one block of 32 weights (of 32 values for F32).
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4 * QK,
            WeightType::Q8_0 => 34,
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "F32",
            WeightType::Q8_0 => "Q8_0",
            WeightType::Q4_0 => "Q4_0",
            WeightType::Q4_1 => "Q4_1",
        }
    }
}

/// Shared, immutable bytes: a range of a buffer delivered by the loader.
#[derive(Clone, Debug)]
pub struct Bytes {
    buf: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl Bytes {
    pub fn new(buf: Arc<Vec<u8>>, range: std::ops::Range<usize>) -> Bytes {
        assert!(range.end <= buf.len(), "range past the buffer");
        Bytes { buf, range }
    }

    /// A sub-range of these bytes.
    pub fn slice(&self, r: std::ops::Range<usize>) -> Bytes {
        assert!(r.end <= self.range.len(), "slice past the bytes");
        Bytes::new(
            self.buf.clone(),
            self.range.start + r.start..self.range.start + r.end,
        )
    }

    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let n = v.len();
        Bytes::new(Arc::new(v), 0..n)
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// A weight matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub wtype: WeightType,
    pub rows: usize,
    pub cols: usize,
    data: MatrixData,
}

#[derive(Clone, Debug)]
enum MatrixData {
    F32(Arc<Vec<f32>>),
    Blocks(Bytes),
}

impl Matrix {
    /// A matrix of f32 values.
    pub fn f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Matrix, String> {
        if values.len() != rows * cols {
            return Err(format!(
                "{} values for a {rows} × {cols} matrix",
                values.len()
            ));
        }
        Ok(Matrix {
            wtype: WeightType::F32,
            rows,
            cols,
            data: MatrixData::F32(Arc::new(values)),
        })
    }

    /// A matrix of quantized blocks; `cols` must be a multiple of 32.
    pub fn blocks(
        wtype: WeightType,
        rows: usize,
        cols: usize,
        data: Bytes,
    ) -> Result<Matrix, String> {
        if wtype == WeightType::F32 {
            return Err("F32 matrices hold values, not blocks".into());
        }
        if !cols.is_multiple_of(QK) {
            return Err(format!(
                "{} rows of {cols} values are not whole blocks of {QK}",
                wtype.name()
            ));
        }
        let want = rows * cols / QK * wtype.block_bytes();
        if data.len() != want {
            return Err(format!(
                "{} {rows} × {cols}: {} bytes, expected {want}",
                wtype.name(),
                data.len()
            ));
        }
        Ok(Matrix {
            wtype,
            rows,
            cols,
            data: MatrixData::Blocks(data),
        })
    }

    /// Bytes of row `r`'s blocks (quantized matrices).
    fn row_blocks(&self, r: usize) -> &[u8] {
        match &self.data {
            MatrixData::Blocks(b) => {
                let rb = self.cols / QK * self.wtype.block_bytes();
                &b[r * rb..(r + 1) * rb]
            }
            MatrixData::F32(_) => unreachable!("row_blocks of an F32 matrix"),
        }
    }

    fn row_f32(&self, r: usize) -> &[f32] {
        match &self.data {
            MatrixData::F32(v) => &v[r * self.cols..(r + 1) * self.cols],
            MatrixData::Blocks(_) => unreachable!("row_f32 of a quantized matrix"),
        }
    }

    /// Bytes the matrix occupies.
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::F32(v) => v.len() * 4,
            MatrixData::Blocks(b) => b.len(),
        }
    }

    /// Row `r` as f32 values (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        match self.wtype {
            WeightType::F32 => out.copy_from_slice(self.row_f32(r)),
            t => dequantize_row(t, self.row_blocks(r), out),
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes one row of blocks.
pub fn dequantize_row(t: WeightType, blocks: &[u8], out: &mut [f32]) {
    let bb = t.block_bytes();
    for (blk, o) in blocks.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        match t {
            WeightType::Q8_0 => {
                let d = f16_at(blk, 0);
                for (v, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *v = d * f32::from(q as i8);
                }
            }
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let d = f16_at(blk, 0);
                let (m, qs) = if t == WeightType::Q4_1 {
                    (f16_at(blk, 2), &blk[4..20])
                } else {
                    (-8.0 * d, &blk[2..18])
                };
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = d * f32::from(q & 15) + m;
                    o[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
            WeightType::F32 => unreachable!("F32 has no blocks"),
        }
    }
}

/// Input vectors quantized to 8 bits in blocks of 32: per block a scale
/// `d`, `s = d · Σq`, and the codes.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    pub n: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub q: Vec<i8>,
}

impl QuantizedActs {
    /// Quantizes `x` (`n` vectors of `cols`, `cols` a multiple of 32),
    /// reusing this value's buffers.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(cols.is_multiple_of(QK) && x.len().is_multiple_of(cols));
        self.n = x.len() / cols;
        self.cols = cols;
        let blocks = x.len() / QK;
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.q.resize(x.len(), 0);
        for (b, (xb, qb)) in x
            .chunks_exact(QK)
            .zip(self.q.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                let c = (v * id).round() as i32;
                *q = c as i8;
                sum += c;
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
    }

    fn row(&self, t: usize) -> (&[f32], &[f32], &[i8]) {
        let nb = self.cols / QK;
        (
            &self.d[t * nb..(t + 1) * nb],
            &self.s[t * nb..(t + 1) * nb],
            &self.q[t * self.cols..(t + 1) * self.cols],
        )
    }
}

// ---------------------------------------------------------------------------
// Scalar references.
// ---------------------------------------------------------------------------

/// One row of blocks · one quantized vector, block by block with integer sums.
pub fn dot_blocks_reference(t: WeightType, w: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
    let bb = t.block_bytes();
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let qx = &q[b * QK..(b + 1) * QK];
        let dw = f16_at(blk, 0);
        acc += match t {
            WeightType::Q8_0 => {
                let sum: i32 = blk[2..34]
                    .iter()
                    .zip(qx)
                    .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
                    .sum();
                dw * d[b] * sum as f32
            }
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let qs = if t == WeightType::Q4_1 {
                    &blk[4..20]
                } else {
                    &blk[2..18]
                };
                let mut sum = 0i32;
                for j in 0..16 {
                    sum += i32::from(qs[j] & 15) * i32::from(qx[j]);
                    sum += i32::from(qs[j] >> 4) * i32::from(qx[j + 16]);
                }
                if t == WeightType::Q4_1 {
                    dw * d[b] * sum as f32 + f16_at(blk, 2) * s[b]
                } else {
                    dw * (d[b] * sum as f32 - 8.0 * s[b])
                }
            }
            WeightType::F32 => unreachable!("F32 has no blocks"),
        };
    }
    acc
}

/// f32 dot product, in order.
pub fn dot_f32_reference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------
// Fast paths.
// ---------------------------------------------------------------------------

/// f32 dot product in 16 independent lanes (vectorized by the compiler).
#[inline(always)]
fn dot_f32_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_lanes(a, b)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("TPDE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 dot product: the fastest path this CPU has.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { dot_f32_avx2(a, b) };
    }
    dot_f32_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Σ of u8 × i8 products of 32 pairs, as 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    /// The 32 nibbles of a Q4 block as bytes 0..15, in weight order.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_srli_epi16::<4>(raw);
        let both = _mm256_set_m128i(hi, raw);
        _mm256_and_si256(both, _mm256_set1_epi8(15))
    }

    #[inline(always)]
    unsafe fn f16c(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Σ over blocks of `scale(b) · Σ(w·x)`, plus Σ `extra(b)`, with two
    /// accumulators so that consecutive blocks do not wait on each other.
    #[inline(always)]
    unsafe fn blocks_loop(nb: usize, block: impl Fn(usize) -> (__m256i, f32, f32)) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let (mut e0, mut e1) = (0.0f32, 0.0f32);
        let mut b = 0;
        while b + 2 <= nb {
            let (s0, k0, x0) = block(b);
            let (s1, k1, x1) = block(b + 1);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(k0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(k1), acc1);
            e0 += x0;
            e1 += x1;
            b += 2;
        }
        if b < nb {
            let (s0, k0, x0) = block(b);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(k0), acc0);
            e0 += x0;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + e0 + e1
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_blocks(t: WeightType, w: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
        let bb = t.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(d.len() >= nb && s.len() >= nb && q.len() >= nb * QK);
        let wp = w.as_ptr();
        let qp = q.as_ptr();
        let x = |b: usize| _mm256_loadu_si256(qp.add(b * QK) as *const __m256i);
        match t {
            WeightType::Q8_0 => blocks_loop(nb, |b| {
                let blk = wp.add(b * bb);
                let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                // |w| × (x with w's sign): u8 × i8 pairs for maddubs.
                let sum = dot_u8_i8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x(b), wv));
                (sum, f16c(blk) * *d.get_unchecked(b), 0.0)
            }),
            WeightType::Q4_1 => blocks_loop(nb, |b| {
                let blk = wp.add(b * bb);
                let sum = dot_u8_i8(nibbles(blk.add(4)), x(b));
                (
                    sum,
                    f16c(blk) * *d.get_unchecked(b),
                    f16c(blk.add(2)) * *s.get_unchecked(b),
                )
            }),
            WeightType::Q4_0 => blocks_loop(nb, |b| {
                let blk = wp.add(b * bb);
                let sum = dot_u8_i8(nibbles(blk.add(2)), x(b));
                let dw = f16c(blk);
                (
                    sum,
                    dw * *d.get_unchecked(b),
                    -8.0 * dw * *s.get_unchecked(b),
                )
            }),
            WeightType::F32 => unreachable!("F32 has no blocks"),
        }
    }
}

/// One row of blocks · one f32 vector, the weights dequantized as they are
/// read: `Σ_b d_b · Σ_j q_bj · x_bj`, plus `m_b · Σ_j x_bj` (Q4_1) or
/// `−8 d_b · Σ_j x_bj` (Q4_0); `xsum[b]` is `Σ_j x_bj`. The reference: in
/// order, one value at a time.
pub fn dot_blocks_f32_reference(t: WeightType, w: &[u8], x: &[f32]) -> f32 {
    let mut row = vec![0.0f32; x.len()];
    dequantize_row(t, w, &mut row);
    dot_f32_reference(&row, x)
}

/// Per block of 32, the sum of the input's values.
pub fn block_sums(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(x.chunks_exact(QK).map(|c| c.iter().sum::<f32>()));
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// One block's `Σ q·x` as 16 lanes (unscaled).
    #[inline(always)]
    unsafe fn block<const T: u8>(blk: *const u8, x: *const f32) -> __m512 {
        block_x::<T>(blk, _mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)))
    }

    /// [`block`] with the block's 32 inputs already loaded.
    #[inline(always)]
    unsafe fn block_x<const T: u8>(blk: *const u8, x0: __m512, x1: __m512) -> __m512 {
        let (w0, w1) = if T == 0 {
            (
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2) as *const __m128i)),
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18) as *const __m128i)),
            )
        } else {
            let off = if T == 2 { 4 } else { 2 };
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(off) as *const __m128i));
            (
                _mm512_and_si512(v, _mm512_set1_epi32(15)),
                _mm512_srli_epi32::<4>(v),
            )
        };
        _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(w1),
            x1,
            _mm512_mul_ps(_mm512_cvtepi32_ps(w0), x0),
        )
    }

    /// `T`: 0 = Q8_0, 1 = Q4_0, 2 = Q4_1. The block scales (and Q4_1's
    /// minimums) are gathered and converted 16 blocks at a time, and the
    /// minimums' term `Σ m·Σx` is one vector product per 16 blocks.
    #[inline(always)]
    unsafe fn dot<const T: u8>(w: &[u8], x: &[f32], xsum: &[f32], bb: usize, nb: usize) -> f32 {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(bb as i32),
        );
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut ext = _mm512_setzero_ps();
        let mut ds = [0.0f32; 16];
        let mut c = 0;
        while c < nb {
            let k = (nb - c).min(16);
            let mask: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            // The first 4 bytes of each block: its f16 scale, then (Q4_1)
            // its f16 minimum. Every block is at least 18 bytes long.
            let g = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                idx,
                wp.add(c * bb) as _,
            );
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
            if T != 0 {
                let xs = _mm512_maskz_loadu_ps(mask, xsum.as_ptr().add(c));
                let m = if T == 2 {
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(g)))
                } else {
                    d
                };
                ext = _mm512_fmadd_ps(m, xs, ext);
            }
            _mm512_storeu_ps(ds.as_mut_ptr(), d);
            let (bp, xq) = (wp.add(c * bb), xp.add(c * QK));
            let mut j = 0;
            while j + 2 <= k {
                let p0 = block::<T>(bp.add(j * bb), xq.add(j * QK));
                let p1 = block::<T>(bp.add((j + 1) * bb), xq.add((j + 1) * QK));
                acc0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(ds[j]), acc0);
                acc1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(ds[j + 1]), acc1);
                j += 2;
            }
            if j < k {
                let p0 = block::<T>(bp.add(j * bb), xq.add(j * QK));
                acc0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(ds[j]), acc0);
            }
            c += 16;
        }
        let e = _mm512_reduce_add_ps(ext);
        let e = match T {
            2 => e,
            1 => -8.0 * e,
            _ => 0.0,
        };
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + e
    }

    /// [`dot`] for `R` rows at once: each block's inputs are loaded once
    /// for all of them, and the rows are `R` independent streams.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // r and j index several arrays
    unsafe fn dot_rows<const T: u8, const R: usize>(
        rows: [*const u8; R],
        x: &[f32],
        xsum: &[f32],
        bb: usize,
        nb: usize,
    ) -> [f32; R] {
        let xp = x.as_ptr();
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(bb as i32),
        );
        let mut acc = [_mm512_setzero_ps(); R];
        let mut ext = [_mm512_setzero_ps(); R];
        let mut ds = [[0.0f32; 16]; R];
        let mut c = 0;
        while c < nb {
            let k = (nb - c).min(16);
            let mask: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            let xs = if T != 0 {
                _mm512_maskz_loadu_ps(mask, xsum.as_ptr().add(c))
            } else {
                _mm512_setzero_ps()
            };
            for r in 0..R {
                let g = _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    mask,
                    idx,
                    rows[r].add(c * bb) as _,
                );
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
                if T != 0 {
                    let m = if T == 2 {
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(g)))
                    } else {
                        d
                    };
                    ext[r] = _mm512_fmadd_ps(m, xs, ext[r]);
                }
                _mm512_storeu_ps(ds[r].as_mut_ptr(), d);
            }
            for j in 0..k {
                let xq = xp.add((c + j) * QK);
                let (x0, x1) = (_mm512_loadu_ps(xq), _mm512_loadu_ps(xq.add(16)));
                for r in 0..R {
                    let p = block_x::<T>(rows[r].add((c + j) * bb), x0, x1);
                    acc[r] = _mm512_fmadd_ps(p, _mm512_set1_ps(ds[r][j]), acc[r]);
                }
            }
            c += 16;
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            let e = _mm512_reduce_add_ps(ext[r]);
            out[r] = _mm512_reduce_add_ps(acc[r])
                + match T {
                    2 => e,
                    1 => -8.0 * e,
                    _ => 0.0,
                };
        }
        out
    }

    /// Four f32 rows · one vector, 16 lanes at a time.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn dot4_f32(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(x.as_ptr().add(i));
            for (a, r) in acc.iter_mut().zip(&rows) {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(r.as_ptr().add(i)), xv, *a);
            }
            i += 16;
        }
        let mut out = acc.map(|a| _mm512_reduce_add_ps(a));
        for j in i..n {
            for (o, r) in out.iter_mut().zip(&rows) {
                *o += r[j] * x[j];
            }
        }
        out
    }

    /// Four f32 rows · two vectors: each row's loads serve both vectors.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn dot4x2_f32(rows: [&[f32]; 4], x: [&[f32]; 2]) -> [[f32; 2]; 4] {
        let n = x[0].len();
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= n {
            let x0 = _mm512_loadu_ps(x[0].as_ptr().add(i));
            let x1 = _mm512_loadu_ps(x[1].as_ptr().add(i));
            for (a, r) in acc.iter_mut().zip(&rows) {
                let w = _mm512_loadu_ps(r.as_ptr().add(i));
                a[0] = _mm512_fmadd_ps(w, x0, a[0]);
                a[1] = _mm512_fmadd_ps(w, x1, a[1]);
            }
            i += 16;
        }
        let mut out = acc.map(|a| a.map(|v| _mm512_reduce_add_ps(v)));
        for j in i..n {
            for (o, r) in out.iter_mut().zip(&rows) {
                o[0] += r[j] * x[0][j];
                o[1] += r[j] * x[1][j];
            }
        }
        out
    }

    /// Four rows of blocks · one f32 vector.
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    pub unsafe fn dot4_blocks_f32(
        t: WeightType,
        rows: [&[u8]; 4],
        x: &[f32],
        xsum: &[f32],
    ) -> [f32; 4] {
        let bb = t.block_bytes();
        let nb = rows[0].len() / bb;
        let p = rows.map(|r| r.as_ptr());
        match t {
            WeightType::Q8_0 => dot_rows::<0, 4>(p, x, xsum, bb, nb),
            WeightType::Q4_0 => dot_rows::<1, 4>(p, x, xsum, bb, nb),
            WeightType::Q4_1 => dot_rows::<2, 4>(p, x, xsum, bb, nb),
            WeightType::F32 => unreachable!("F32 has no blocks"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    pub unsafe fn dot_blocks_f32(t: WeightType, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bb = t.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(x.len() >= nb * QK && xsum.len() >= nb);
        match t {
            WeightType::Q8_0 => dot::<0>(w, x, xsum, bb, nb),
            WeightType::Q4_0 => dot::<1>(w, x, xsum, bb, nb),
            WeightType::Q4_1 => dot::<2>(w, x, xsum, bb, nb),
            WeightType::F32 => unreachable!("F32 has no blocks"),
        }
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("TPDE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable form of the f32-input block product: block by block, the
/// block's codes dequantized to a small buffer.
fn dot_blocks_f32_portable(t: WeightType, w: &[u8], x: &[f32]) -> f32 {
    let bb = t.block_bytes();
    let mut vals = [0.0f32; QK];
    let mut acc = 0.0;
    for (blk, xb) in w.chunks_exact(bb).zip(x.chunks_exact(QK)) {
        dequantize_row(t, blk, &mut vals);
        acc += dot_f32_lanes(&vals, xb);
    }
    acc
}

/// The activation precision with the faster kernel on this CPU: f32 with
/// AVX-512, 8-bit with AVX2 only, f32 otherwise (both portable).
pub fn preferred_activations() -> Activations {
    if has_avx512() || !has_avx2() {
        Activations::F32
    } else {
        Activations::Q8
    }
}

/// One row of blocks · one f32 vector: the fastest path this CPU has.
pub fn dot_blocks_f32(t: WeightType, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let nb = w.len() / t.block_bytes();
    assert!(x.len() >= nb * QK && xsum.len() >= nb);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected; lengths checked above.
        return unsafe { avx512::dot_blocks_f32(t, w, x, xsum) };
    }
    dot_blocks_f32_portable(t, w, x)
}

/// Four rows of blocks (of one length) · one f32 vector: the fastest path
/// this CPU has.
pub fn dot4_blocks_f32(t: WeightType, rows: [&[u8]; 4], x: &[f32], xsum: &[f32]) -> [f32; 4] {
    let nb = rows[0].len() / t.block_bytes();
    assert!(rows.iter().all(|r| r.len() == rows[0].len()));
    assert!(x.len() >= nb * QK && xsum.len() >= nb);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected; lengths checked above.
        return unsafe { avx512::dot4_blocks_f32(t, rows, x, xsum) };
    }
    rows.map(|r| dot_blocks_f32_portable(t, r, x))
}

/// One row of blocks · one quantized vector: the fastest path this CPU has.
pub fn dot_blocks(t: WeightType, w: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
    let nb = w.len() / t.block_bytes();
    assert!(d.len() >= nb && s.len() >= nb && q.len() >= nb * QK);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && is_f16c() {
        // SAFETY: AVX2, FMA and F16C were detected; lengths checked above.
        return unsafe { avx2::dot_blocks(t, w, d, s, q) };
    }
    dot_blocks_reference(t, w, d, s, q)
}

#[cfg(target_arch = "x86_64")]
fn is_f16c() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("f16c"))
}

/// How block weights meet their input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// f32 inputs, weights dequantized in registers: the products of the
    /// dequantized weights, up to summation order.
    F32,
    /// Inputs quantized to 8 bits per block of 32 and integer block sums,
    /// as llama.cpp computes: less arithmetic, a small error.
    Q8,
}

/// What a product needs of its input: the f32 vectors, and for block
/// weights either their per-block sums (`Activations::F32`) or their 8-bit
/// form (`Activations::Q8`).
pub struct Input<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub mode: Activations,
    pub xsum: &'a [f32],
    pub q: &'a QuantizedActs,
}

/// Asserts that `w`, `input` and `out` fit together.
fn check_shapes(w: &Matrix, input: &Input, out: &[f32]) {
    let (n, rows, cols) = (input.n, w.rows, w.cols);
    assert_eq!(input.x.len(), n * cols, "input length");
    assert_eq!(out.len(), n * rows, "output length");
    if w.wtype != WeightType::F32 {
        match input.mode {
            Activations::Q8 => {
                assert!(
                    input.q.n == n && input.q.cols == cols,
                    "quantized input shape"
                )
            }
            Activations::F32 => assert_eq!(input.xsum.len(), n * cols / QK, "block sums"),
        }
    }
}

/// Row `r` of `w` · input vector `t`, with the fastest kernel this CPU has.
#[inline]
fn row_dot(w: &Matrix, input: &Input, r: usize, t: usize) -> f32 {
    let cols = w.cols;
    match w.wtype {
        WeightType::F32 => dot_f32(w.row_f32(r), &input.x[t * cols..(t + 1) * cols]),
        ty if input.mode == Activations::F32 => {
            let nb = cols / QK;
            dot_blocks_f32(
                ty,
                w.row_blocks(r),
                &input.x[t * cols..(t + 1) * cols],
                &input.xsum[t * nb..(t + 1) * nb],
            )
        }
        ty => {
            let (d, s, q) = input.q.row(t);
            dot_blocks(ty, w.row_blocks(r), d, s, q)
        }
    }
}

/// `outs[i] = ws[i] · x` for several matrices of one input (`x` then has
/// every matrix's width): one job for the team, each member taking its
/// part of every matrix's rows (a static split measured faster here than
/// members taking chunks as they free up: 160–169 against 149–151 tok/s).
/// With several input vectors, one [`matmul`] after the other.
pub fn matmul_many(ws: &[&Matrix], input: &Input, outs: &mut [&mut [f32]], scratch: &mut Vec<f32>) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    if input.n != 1 {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            matmul(w, input, o, scratch);
        }
        return;
    }
    for (w, o) in ws.iter().zip(outs.iter()) {
        check_shapes(w, input, o);
    }
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    Team::global().run(&|i, k| {
        for (w, o) in ws.iter().zip(&ptrs) {
            let (a, b) = team::part(w.rows, i, k, 16);
            // SAFETY: the members' parts are disjoint and inside the
            // output, which outlives the job.
            let out = unsafe { o.part(a, b - a) };
            let mut r = a;
            // Four rows at a time where the kernel has them (measured
            // 179-185 against 160-173 tok/s one row at a time, and 158-170
            // eight at a time).
            if w.wtype != WeightType::F32 && input.mode == Activations::F32 {
                while r + 4 <= b {
                    let rs = [r, r + 1, r + 2, r + 3].map(|k| w.row_blocks(k));
                    let v = dot4_blocks_f32(w.wtype, rs, input.x, input.xsum);
                    out[r - a..r - a + 4].copy_from_slice(&v);
                    r += 4;
                }
            }
            for (r, v) in (r..b).zip(&mut out[r - a..]) {
                *v = row_dot(w, input, r, 0);
            }
        }
    });
}

/// A tpde base (`layout`: codec q4 or q8, group size, width; `rows`
/// rows of blocks back to back, each an f16 scale `d` then the group's
/// codes `q`, standing for `q × d`) as GGML blocks of 32 holding the same
/// values: Q4_0 for q4 (a group of 64 becomes two blocks with its scale),
/// Q8_0 for q8. `Ok(None)` when a group is not a whole number of 32
/// elements; an error for a base a conforming writer cannot produce (a
/// scale that is not finite, a q8 code −128, the wrong length).
pub fn base_as_ggml(
    layout: &tpde_format::BaseLayout,
    rows: usize,
    base: &[u8],
) -> Result<Option<(WeightType, Vec<u8>)>, String> {
    use tpde_format::BaseCodec;
    let (g, cols) = (layout.group, layout.cols);
    if g == 0 || !g.is_multiple_of(QK) || !cols.is_multiple_of(QK) {
        return Ok(None);
    }
    let row_bytes = layout.row_bytes();
    if base.len() != rows * row_bytes {
        return Err(format!(
            "base of {} bytes, expected {rows} rows of {row_bytes}",
            base.len()
        ));
    }
    let (ty, out_block) = match layout.codec {
        BaseCodec::Q4 => (WeightType::Q4_0, 2 + QK / 2),
        BaseCodec::Q8 => (WeightType::Q8_0, 2 + QK),
    };
    let mut out = Vec::with_capacity(rows * cols / QK * out_block);
    for row in base.chunks_exact(row_bytes) {
        let mut at = 0;
        let mut col = 0;
        while col < cols {
            let n = g.min(cols - col);
            let blk = &row[at..at + layout.block_bytes(n)];
            at += blk.len();
            col += n;
            let d = [blk[0], blk[1]];
            if u16::from_le_bytes(d) & 0x7c00 == 0x7c00 {
                return Err("a base block's scale is not finite".into());
            }
            let codes = &blk[2..];
            for k in 0..n / QK {
                out.extend_from_slice(&d);
                match layout.codec {
                    BaseCodec::Q4 => {
                        // Code i of the group is in byte i/2, low nibble when
                        // i is even; Q4_0 keeps element j in the low nibble
                        // of byte j and element j + 16 in its high nibble.
                        let nib = |i: usize| (codes[i / 2] >> (4 * (i % 2))) & 15;
                        for j in 0..QK / 2 {
                            out.push(nib(k * QK + j) | nib(k * QK + j + QK / 2) << 4);
                        }
                    }
                    BaseCodec::Q8 => {
                        let c = &codes[k * QK..(k + 1) * QK];
                        if c.contains(&0x80) {
                            return Err("a q8 base code is -128".into());
                        }
                        out.extend_from_slice(c);
                    }
                }
            }
        }
    }
    Ok(Some((ty, out)))
}

/// The values of a tpde base (`q × d` in f32), for what the block kernels
/// do not take.
pub fn base_values_f32(
    layout: &tpde_format::BaseLayout,
    rows: usize,
    base: &[u8],
) -> Result<Vec<f32>, String> {
    use tpde_format::BaseCodec;
    let row_bytes = layout.row_bytes();
    if base.len() != rows * row_bytes {
        return Err(format!(
            "base of {} bytes, expected {rows} rows of {row_bytes}",
            base.len()
        ));
    }
    let mut out = Vec::with_capacity(rows * layout.cols);
    for row in base.chunks_exact(row_bytes) {
        let (mut at, mut col) = (0, 0);
        while col < layout.cols {
            let n = layout.group.min(layout.cols - col);
            let blk = &row[at..at + layout.block_bytes(n)];
            at += blk.len();
            col += n;
            let d = f16_at(blk, 0);
            if !d.is_finite() {
                return Err("a base block's scale is not finite".into());
            }
            for i in 0..n {
                let q = match layout.codec {
                    BaseCodec::Q4 => ((blk[2 + i / 2] >> (4 * (i % 2))) & 15) as i32 - 8,
                    BaseCodec::Q8 => blk[2 + i] as i8 as i32,
                };
                out.push(q as f32 * d);
            }
        }
    }
    Ok(out)
}

/// From this many vectors on, [`matmul`] dequantizes block rows once and
/// multiplies in f32 rather than dequantizing in registers for each vector.
const DEQUANT_BATCH: usize = 8;

/// Four f32 rows · one vector (each row as long as the vector).
pub fn dot4_f32(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    assert!(rows.iter().all(|r| r.len() == x.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected; lengths checked above.
        return unsafe { avx512::dot4_f32(rows, x) };
    }
    rows.map(|r| dot_f32(r, x))
}

/// Four f32 rows · two vectors: `out[row][vector]`.
pub fn dot4x2_f32(rows: [&[f32]; 4], x: [&[f32]; 2]) -> [[f32; 2]; 4] {
    assert!(rows.iter().all(|r| r.len() == x[0].len()) && x[1].len() == x[0].len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected; lengths checked above.
        return unsafe { avx512::dot4x2_f32(rows, x) };
    }
    rows.map(|r| [dot_f32(r, x[0]), dot_f32(r, x[1])])
}

/// An output that the members of a team fill in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: each member writes only its own part (see the users).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// `len` values from `at`.
    ///
    /// # Safety
    ///
    /// In bounds of the output, and no other member's part.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// `out[t][r] = W[r] · x[t]` for every row `r` and vector `t`; rows are
/// split among the members of the engine's [`Team`]. `scratch` is reused
/// between calls.
pub fn matmul(w: &Matrix, input: &Input, out: &mut [f32], scratch: &mut Vec<f32>) {
    check_shapes(w, input, out);
    let (n, rows) = (input.n, w.rows);
    let team = Team::global();
    if n == 1 {
        matmul_many(&[w], input, &mut [out], scratch);
        return;
    }
    // Row-major by weight row, so that each row stays in cache while it
    // meets every vector; then transposed into `out`.
    scratch.resize(rows * n, 0.0);
    let o = OutPtr(scratch.as_mut_ptr());
    team.run(&|i, k| {
        let (a, b) = team::part(rows, i, k, 1);
        // SAFETY: the members' parts are disjoint and inside `scratch`,
        // which outlives the job.
        let o = unsafe { o.part(a * n, (b - a) * n) };
        let mut r = a;
        if w.wtype != WeightType::F32 && input.mode == Activations::F32 && n >= DEQUANT_BATCH {
            // Many vectors: four rows dequantized once, then plain f32
            // products with each vector.
            let cols = w.cols;
            let mut rows4 = vec![0.0f32; 4 * cols];
            while r + 4 <= b {
                for (i, dst) in rows4.chunks_exact_mut(cols).enumerate() {
                    w.row_into(r + i, dst);
                }
                let (w0, rest) = rows4.split_at(cols);
                let (w1, rest) = rest.split_at(cols);
                let (w2, w3) = rest.split_at(cols);
                let mut t = 0;
                while t + 2 <= n {
                    let x2 = [
                        &input.x[t * cols..(t + 1) * cols],
                        &input.x[(t + 1) * cols..(t + 2) * cols],
                    ];
                    let v = dot4x2_f32([w0, w1, w2, w3], x2);
                    for (i, v) in v.into_iter().enumerate() {
                        o[(r - a + i) * n + t] = v[0];
                        o[(r - a + i) * n + t + 1] = v[1];
                    }
                    t += 2;
                }
                if t < n {
                    let v = dot4_f32([w0, w1, w2, w3], &input.x[t * cols..(t + 1) * cols]);
                    for (i, v) in v.into_iter().enumerate() {
                        o[(r - a + i) * n + t] = v;
                    }
                }
                r += 4;
            }
        }
        if w.wtype != WeightType::F32 && input.mode == Activations::F32 {
            let (cols, nb) = (w.cols, w.cols / QK);
            while r + 4 <= b {
                let rs = [r, r + 1, r + 2, r + 3].map(|k| w.row_blocks(k));
                for t in 0..n {
                    let x = &input.x[t * cols..(t + 1) * cols];
                    let v = dot4_blocks_f32(w.wtype, rs, x, &input.xsum[t * nb..(t + 1) * nb]);
                    for (i, v) in v.into_iter().enumerate() {
                        o[(r - a + i) * n + t] = v;
                    }
                }
                r += 4;
            }
        }
        for (row, r) in o[(r - a) * n..].chunks_exact_mut(n).zip(r..b) {
            for (t, v) in row.iter_mut().enumerate() {
                *v = row_dot(w, input, r, t);
            }
        }
    });
    for r in 0..rows {
        for t in 0..n {
            out[t * rows + r] = scratch[r * n + t];
        }
    }
}

/// The plain reference of [`matmul`]: dequantized weights, f32 sums, one
/// thread. Differs from [`matmul`] by the quantization of the input.
pub fn matmul_reference(w: &Matrix, x: &[f32], n: usize, out: &mut [f32]) {
    let mut row = vec![0.0f32; w.cols];
    for r in 0..w.rows {
        w.row_into(r, &mut row);
        for t in 0..n {
            out[t * w.rows + r] = dot_f32_reference(&row, &x[t * w.cols..(t + 1) * w.cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn random_blocks(t: WeightType, n_blocks: usize, seed: &mut u64) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..n_blocks {
            let d = f16::from_f32((lcg(seed) % 1000) as f32 / 40000.0 + 1e-4);
            v.extend(d.to_bits().to_le_bytes());
            if t == WeightType::Q4_1 {
                let m = f16::from_f32(-((lcg(seed) % 1000) as f32) / 20000.0);
                v.extend(m.to_bits().to_le_bytes());
            }
            let n = if t == WeightType::Q8_0 { 32 } else { 16 };
            for _ in 0..n {
                v.push(lcg(seed) as u8);
            }
        }
        v
    }

    fn random_f32(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| (lcg(seed) % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    #[test]
    fn fast_dot_matches_reference() {
        let mut seed = 7;
        for t in [WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1] {
            for nb in [1, 2, 7, 16, 17, 18, 33, 48] {
                let w = random_blocks(t, nb, &mut seed);
                let mut x = random_f32(nb * QK, &mut seed);
                // Extreme codes: -128 must not appear (scale is amax / 127).
                x[0] = 5.0;
                let mut qa = QuantizedActs::default();
                qa.quantize(&x, nb * QK);
                let (d, s, q) = qa.row(0);
                let want = dot_blocks_reference(t, &w, d, s, q);
                let got = dot_blocks(t, &w, d, s, q);
                let tol = 1e-5 * (1.0 + want.abs()) * nb as f32;
                assert!((got - want).abs() <= tol, "{t:?} {nb}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn dequantized_dot_is_close_to_quantized_dot() {
        // The integer path differs from f32 math only by the input's 8-bit
        // quantization: within 1 % of the magnitude sum here.
        let mut seed = 11;
        for t in [WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1] {
            let nb = 24;
            let w = random_blocks(t, nb, &mut seed);
            let x = random_f32(nb * QK, &mut seed);
            let mut row = vec![0.0; nb * QK];
            dequantize_row(t, &w, &mut row);
            let exact = dot_f32_reference(&row, &x);
            let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let mut qa = QuantizedActs::default();
            qa.quantize(&x, nb * QK);
            let (d, s, q) = qa.row(0);
            let got = dot_blocks(t, &w, d, s, q);
            assert!((got - exact).abs() <= 0.01 * mag, "{t:?}: {got} vs {exact}");
        }
    }

    #[test]
    fn f32_input_block_dot_matches_reference() {
        let mut seed = 9;
        for t in [WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1] {
            for nb in [1, 2, 7, 16, 17, 18, 33, 48] {
                let w = random_blocks(t, nb, &mut seed);
                let x = random_f32(nb * QK, &mut seed);
                let mut xsum = Vec::new();
                block_sums(&x, &mut xsum);
                let want = dot_blocks_f32_reference(t, &w, &x);
                let fast = dot_blocks_f32(t, &w, &x, &xsum);
                let portable = dot_blocks_f32_portable(t, &w, &x);
                let tol = 1e-5 * (1.0 + want.abs()) * nb as f32;
                assert!((fast - want).abs() <= tol, "{t:?} {nb}: {fast} vs {want}");
                assert!(
                    (portable - want).abs() <= tol,
                    "{t:?} {nb}: {portable} vs {want}"
                );
            }
        }
    }

    /// A random tpde base: `rows` rows of `cols`, groups of `g`.
    fn random_base(layout: &tpde_format::BaseLayout, rows: usize, seed: &mut u64) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rows {
            let mut col = 0;
            while col < layout.cols {
                let n = layout.group.min(layout.cols - col);
                col += n;
                // A finite scale, sometimes -0 (a group of zeros).
                let d = if lcg(seed).is_multiple_of(7) {
                    half::f16::NEG_ZERO
                } else {
                    half::f16::from_f32((lcg(seed) % 2000) as f32 / 1e4 - 0.1)
                };
                out.extend_from_slice(&d.to_le_bytes());
                match layout.codec {
                    tpde_format::BaseCodec::Q4 => {
                        for _ in 0..n.div_ceil(2) {
                            out.push((lcg(seed) & 0xff) as u8);
                        }
                    }
                    tpde_format::BaseCodec::Q8 => {
                        for _ in 0..n {
                            out.push(((lcg(seed) % 255) as i32 - 127) as i8 as u8);
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn base_blocks_repack_to_the_same_values() {
        use tpde_format::{BaseCodec, BaseLayout};
        let mut seed = 31;
        for codec in [BaseCodec::Q4, BaseCodec::Q8] {
            for (group, cols) in [(32, 64), (64, 64), (64, 192), (128, 96), (256, 576)] {
                let layout = BaseLayout { codec, group, cols };
                let rows = 3;
                let base = random_base(&layout, rows, &mut seed);
                let want = base_values_f32(&layout, rows, &base).unwrap();
                let (t, blocks) = base_as_ggml(&layout, rows, &base).unwrap().unwrap();
                let m = Matrix::blocks(t, rows, cols, Bytes::from_vec(blocks)).unwrap();
                let mut got = vec![0.0f32; cols];
                for r in 0..rows {
                    m.row_into(r, &mut got);
                    let w = &want[r * cols..(r + 1) * cols];
                    // Equal values (Q4_0's `d·nib − 8d` gives +0 where
                    // `q·d` gives −0).
                    assert!(
                        got.iter().zip(w).all(|(a, b)| a == b),
                        "{codec:?} g{group} c{cols} row {r}"
                    );
                }
            }
        }
        // Groups that are not whole blocks of 32 are left to the f32 path.
        let odd = BaseLayout {
            codec: BaseCodec::Q4,
            group: 48,
            cols: 96,
        };
        let base = random_base(&odd, 2, &mut seed);
        assert!(base_as_ggml(&odd, 2, &base).unwrap().is_none());
        assert_eq!(base_values_f32(&odd, 2, &base).unwrap().len(), 192);
        // Bases no conforming writer makes are errors, not numbers.
        let l = BaseLayout {
            codec: BaseCodec::Q8,
            group: 32,
            cols: 32,
        };
        let mut b = random_base(&l, 1, &mut seed);
        b[5] = 0x80;
        assert!(base_as_ggml(&l, 1, &b).is_err());
        let mut b = random_base(&l, 1, &mut seed);
        b[..2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        assert!(base_as_ggml(&l, 1, &b).is_err());
        assert!(base_values_f32(&l, 1, &b).is_err());
        assert!(base_as_ggml(&l, 2, &b).is_err(), "wrong length");
    }

    #[test]
    fn four_row_block_dot_matches_reference() {
        let mut seed = 21;
        for t in [WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1] {
            for nb in [1, 7, 16, 17, 18, 48] {
                let rows: Vec<Vec<u8>> = (0..4).map(|_| random_blocks(t, nb, &mut seed)).collect();
                let x = random_f32(nb * QK, &mut seed);
                let mut xsum = Vec::new();
                block_sums(&x, &mut xsum);
                let got = dot4_blocks_f32(t, [&rows[0], &rows[1], &rows[2], &rows[3]], &x, &xsum);
                for (r, g) in rows.iter().zip(got) {
                    let want = dot_blocks_f32_reference(t, r, &x);
                    let tol = 1e-5 * (1.0 + want.abs()) * nb as f32;
                    assert!((g - want).abs() <= tol, "{t:?} {nb}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn four_row_f32_dots_match_reference() {
        let mut seed = 41;
        for n in [16, 17, 64, 100, 576] {
            let rows: Vec<Vec<f32>> = (0..4).map(|_| random_f32(n, &mut seed)).collect();
            let r = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let (x0, x1) = (random_f32(n, &mut seed), random_f32(n, &mut seed));
            let one = dot4_f32(r, &x0);
            let two = dot4x2_f32(r, [&x0, &x1]);
            for (k, row) in rows.iter().enumerate() {
                for (got, x) in [(one[k], &x0), (two[k][0], &x0), (two[k][1], &x1)] {
                    let want = dot_f32_reference(row, x);
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_dot_matches_reference() {
        let mut seed = 3;
        for n in [0, 1, 15, 16, 17, 100, 576] {
            let a = random_f32(n, &mut seed);
            let b = random_f32(n, &mut seed);
            let want = dot_f32_reference(&a, &b);
            let got = dot_f32(&a, &b);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + n as f32),
                "{n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn several_products_in_one_job_match_the_reference() {
        let mut seed = 11;
        let cols = 64;
        // Row counts that split unevenly between members, of every type.
        let ms: Vec<Matrix> = [
            (WeightType::Q4_1, 70),
            (WeightType::F32, 5),
            (WeightType::Q8_0, 33),
            (WeightType::Q4_0, 1),
        ]
        .into_iter()
        .map(|(t, rows)| {
            if t == WeightType::F32 {
                Matrix::f32(rows, cols, random_f32(rows * cols, &mut seed)).unwrap()
            } else {
                let b = random_blocks(t, rows * cols / QK, &mut seed);
                Matrix::blocks(t, rows, cols, Bytes::from_vec(b)).unwrap()
            }
        })
        .collect();
        let x = random_f32(cols, &mut seed);
        let mut xsum = Vec::new();
        block_sums(&x, &mut xsum);
        let qa = QuantizedActs::default();
        let input = Input {
            x: &x,
            n: 1,
            mode: Activations::F32,
            xsum: &xsum,
            q: &qa,
        };
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![f32::NAN; m.rows]).collect();
        let ws: Vec<&Matrix> = ms.iter().collect();
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        matmul_many(&ws, &input, &mut refs, &mut Vec::new());
        for (m, got) in ms.iter().zip(&outs) {
            let mut want = vec![0.0; m.rows];
            matmul_reference(m, &x, 1, &mut want);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{:?}: {g} vs {w}",
                    m.wtype
                );
            }
        }
    }

    #[test]
    fn matmul_matches_reference_for_every_type_and_batch() {
        let mut seed = 5;
        let (rows, cols) = (67, 96);
        for t in [
            WeightType::F32,
            WeightType::Q8_0,
            WeightType::Q4_0,
            WeightType::Q4_1,
        ] {
            let m = if t == WeightType::F32 {
                Matrix::f32(rows, cols, random_f32(rows * cols, &mut seed)).unwrap()
            } else {
                let b = random_blocks(t, rows * cols / QK, &mut seed);
                Matrix::blocks(t, rows, cols, Bytes::from_vec(b)).unwrap()
            };
            // 9: from DEQUANT_BATCH on, rows are dequantized once (an odd
            // count also takes the single-vector tail).
            for n in [1, 3, 9] {
                let x = random_f32(n * cols, &mut seed);
                let mut qa = QuantizedActs::default();
                qa.quantize(&x, cols);
                let input = Input {
                    x: &x,
                    n,
                    mode: Activations::Q8,
                    xsum: &[],
                    q: &qa,
                };
                let mut got = vec![0.0; n * rows];
                matmul(&m, &input, &mut got, &mut Vec::new());
                // The f32-input path equals the reference up to summation order.
                let mut xsum = Vec::new();
                block_sums(&x, &mut xsum);
                let input32 = Input {
                    x: &x,
                    n,
                    mode: Activations::F32,
                    xsum: &xsum,
                    q: &qa,
                };
                let mut got32 = vec![0.0; n * rows];
                matmul(&m, &input32, &mut got32, &mut Vec::new());
                let mut want32 = vec![0.0; n * rows];
                matmul_reference(&m, &x, n, &mut want32);
                for (g, w) in got32.iter().zip(&want32) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{t:?} f32: {g} vs {w}"
                    );
                }
                // Against the same quantized input, computed row by row.
                for tt in 0..n {
                    for r in 0..rows {
                        let want = if t == WeightType::F32 {
                            dot_f32_reference(m.row_f32(r), &x[tt * cols..(tt + 1) * cols])
                        } else {
                            let (d, s, q) = qa.row(tt);
                            dot_blocks_reference(t, m.row_blocks(r), d, s, q)
                        };
                        let g = got[tt * rows + r];
                        assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{t:?}");
                    }
                }
                let mut reference = vec![0.0; n * rows];
                matmul_reference(&m, &x, n, &mut reference);
                let err = got
                    .iter()
                    .zip(&reference)
                    .fold(0.0f32, |a, (g, r)| a.max((g - r).abs()));
                assert!(err < 0.2, "{t:?}: {err}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Matrix::blocks(WeightType::Q4_1, 2, 33, Bytes::from_vec(vec![0; 40])).is_err());
        assert!(Matrix::blocks(WeightType::Q4_1, 2, 32, Bytes::from_vec(vec![0; 39])).is_err());
        assert!(Matrix::f32(2, 2, vec![0.0; 3]).is_err());
    }
}
