//! rANS: a static-model entropy coder over bytes.
//!
//! For streams whose statistics are known before they are coded (the
//! exact residual's byte planes): the symbol frequencies are counted,
//! normalized to a total of `2^PROB_BITS`, stored at the head of the
//! stream, and every symbol costs close to `−log2 p` bits. 32 coder
//! states are interleaved (symbol `i` is coded by lane `i mod LANES`), so
//! that the decoder's dependency chains run side by side.
//!
//! ## Stream
//!
//! ```text
//! u32 le        n: symbols coded
//! if n > 0:
//!   u8 lo, u8 hi          the smallest and largest symbol present (lo ≤ hi)
//!   varint × (hi − lo + 1)  frequency of each symbol lo..=hi (LEB128; 0: absent),
//!                           summing to 2^PROB_BITS
//!   u32 le × LANES        the encoder's final states: the decoder's first
//!   u16 le × k            renormalization words, in decoding order, to the end
//! ```
//!
//! The decoder reads nothing past the end of the stream, and rejects a
//! stream whose table does not sum to `2^PROB_BITS`, whose states start
//! outside `[RANS_L, 2^32)`, that runs out of words, or that does not end
//! with every lane back at `RANS_L` and every word read: corruption is an
//! error, never a panic or bytes beyond the output.

use crate::CodecError;

/// Frequencies sum to `2^PROB_BITS`.
pub const PROB_BITS: u32 = 12;
const M: u32 = 1 << PROB_BITS;
/// States live in `[RANS_L, 2^32)`; renormalization moves 16 bits at a time.
pub const RANS_L: u32 = 1 << 16;
/// Interleaved coder states: two AVX-512 vectors of 16, whose dependency
/// chains the fast decoder runs side by side.
pub const LANES: usize = 32;

fn corrupt(m: impl Into<String>) -> CodecError {
    CodecError::Corrupt(format!("rans: {}", m.into()))
}

/// Symbol frequencies normalized to sum to `2^PROB_BITS`, every symbol
/// present at least 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub freq: [u32; 256],
    /// `cum[s]`: the sum of the frequencies of the symbols below `s`.
    pub cum: [u32; 257],
}

impl Table {
    /// From symbol counts (not all zero).
    pub fn from_counts(counts: &[u64; 256]) -> Table {
        let n: u64 = counts.iter().sum();
        assert!(n > 0, "no symbols to model");
        let mut freq = [0u32; 256];
        for (f, &c) in freq.iter_mut().zip(counts) {
            if c > 0 {
                *f = ((c as u128 * M as u128 / n as u128) as u32).max(1);
            }
        }
        // Make the total exactly M: take from, or give to, the largest.
        let mut total: u32 = freq.iter().sum();
        while total != M {
            let big = (0..256).max_by_key(|&s| (freq[s], s)).expect("256 symbols");
            if total > M {
                // Every present symbol keeps at least 1: the largest has
                // more than 1 whenever the total exceeds M (at most 256
                // symbols, M > 256).
                let take = (total - M).min(freq[big] - 1);
                freq[big] -= take;
                total -= take;
            } else {
                freq[big] += M - total;
                total = M;
            }
        }
        Table::from_freq(freq).expect("normalized")
    }

    /// From normalized frequencies; `None` unless they sum to `2^PROB_BITS`.
    pub fn from_freq(freq: [u32; 256]) -> Option<Table> {
        let mut cum = [0u32; 257];
        for s in 0..256 {
            cum[s + 1] = cum[s].checked_add(freq[s])?;
        }
        (cum[256] == M).then_some(Table { freq, cum })
    }

    /// Bits the coded symbols cost under this table, ideally.
    pub fn cost_bits(&self, counts: &[u64; 256]) -> f64 {
        counts
            .iter()
            .zip(&self.freq)
            .filter(|(&c, _)| c > 0)
            .map(|(&c, &f)| c as f64 * (PROB_BITS as f64 - (f as f64).log2()))
            .sum()
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads bytes front to back, every read checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], CodecError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| corrupt("stream cut short"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, CodecError> {
        let mut v = 0u32;
        for shift in (0..35).step_by(7) {
            let b = self.u8()?;
            let part = u32::from(b & 0x7f);
            if shift == 28 && part > 0xf {
                return Err(corrupt("varint overflows 32 bits"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }
}

/// Codes `data` (any length, including 0).
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    if data.is_empty() {
        return out;
    }
    assert!(data.len() <= u32::MAX as usize, "stream too long");
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let t = Table::from_counts(&counts);
    let lo = counts.iter().position(|&c| c > 0).expect("non-empty");
    let hi = counts.iter().rposition(|&c| c > 0).expect("non-empty");
    out.push(lo as u8);
    out.push(hi as u8);
    for s in lo..=hi {
        put_varint(&mut out, t.freq[s]);
    }
    // Encode back to front; the words come out in reverse decoding order.
    let mut state = [RANS_L; LANES];
    let mut words: Vec<u16> = Vec::with_capacity(data.len() / 2 + LANES);
    for (i, &b) in data.iter().enumerate().rev() {
        let x = &mut state[i % LANES];
        let (f, c) = (t.freq[b as usize], t.cum[b as usize]);
        // Keep the state below the bound from which coding this symbol
        // would overflow 32 bits.
        let x_max = ((RANS_L >> PROB_BITS) << 16) as u64 * f as u64;
        if *x as u64 >= x_max {
            words.push(*x as u16);
            *x >>= 16;
        }
        *x = ((*x / f) << PROB_BITS) + (*x % f) + c;
    }
    for x in state {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.reserve(words.len() * 2);
    for w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// The header of a stream: symbols, table, initial states, and where the
/// words start.
struct Header {
    n: usize,
    table: Table,
    states: [u32; LANES],
    words_at: usize,
}

fn header(stream: &[u8], want: usize) -> Result<Option<Header>, CodecError> {
    let mut r = Reader { b: stream, at: 0 };
    let n = r.u32()? as usize;
    if n != want {
        return Err(corrupt(format!("{n} symbols coded, {want} expected")));
    }
    if n == 0 {
        if r.at != stream.len() {
            return Err(corrupt("bytes after an empty stream"));
        }
        return Ok(None);
    }
    let (lo, hi) = (r.u8()? as usize, r.u8()? as usize);
    if lo > hi {
        return Err(corrupt("symbol range reversed"));
    }
    let mut freq = [0u32; 256];
    for f in &mut freq[lo..=hi] {
        *f = r.varint()?;
        if *f > M {
            return Err(corrupt("frequency above the total"));
        }
    }
    let table = Table::from_freq(freq).ok_or_else(|| corrupt("frequencies do not sum to 4096"))?;
    let mut states = [0u32; LANES];
    for s in &mut states {
        *s = r.u32()?;
        if *s < RANS_L {
            return Err(corrupt("state below the coder's range"));
        }
    }
    if !(stream.len() - r.at).is_multiple_of(2) {
        return Err(corrupt("odd number of word bytes"));
    }
    Ok(Some(Header {
        n,
        table,
        states,
        words_at: r.at,
    }))
}

fn finish(states: &[u32; LANES], words_read: usize, words: usize) -> Result<(), CodecError> {
    if words_read != words {
        return Err(corrupt(format!(
            "{} of {words} words left unread",
            words - words_read
        )));
    }
    if states.iter().any(|&x| x != RANS_L) {
        return Err(corrupt("the coder did not end where it began"));
    }
    Ok(())
}

/// The plain decoder: one symbol at a time, its slot found by scanning the
/// cumulative frequencies. The reference the fast decoder is tested against.
pub fn decode_reference(stream: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let Some(h) = header(stream, out.len())? else {
        return Ok(());
    };
    let words = &stream[h.words_at..];
    let n_words = words.len() / 2;
    let mut next = 0usize;
    let mut states = h.states;
    let t = &h.table;
    for (i, o) in out.iter_mut().enumerate().take(h.n) {
        let x = &mut states[i % LANES];
        let slot = *x & (M - 1);
        let s = (0..256)
            .find(|&s| t.cum[s + 1] > slot)
            .expect("cum[256] = M > slot");
        *o = s as u8;
        *x = t.freq[s] * (*x >> PROB_BITS) + slot - t.cum[s];
        if *x < RANS_L {
            if next >= n_words {
                return Err(corrupt("out of words"));
            }
            let w = u16::from_le_bytes([words[2 * next], words[2 * next + 1]]);
            next += 1;
            *x = (*x << 16) | u32::from(w);
        }
    }
    finish(&states, next, n_words)
}

/// Decodes a stream of exactly `out.len()` symbols into `out`, with the
/// fastest path this CPU has (AVX-512: 32 lanes as two vectors, words
/// expanded into the lanes that renormalize).
pub fn decode(stream: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    decode_with(stream, out, true)
}

/// [`decode`] without SIMD: table lookups, lane by lane.
pub fn decode_portable(stream: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    decode_with(stream, out, false)
}

fn decode_with(stream: &[u8], out: &mut [u8], simd: bool) -> Result<(), CodecError> {
    let Some(h) = header(stream, out.len())? else {
        return Ok(());
    };
    let t = &h.table;
    // Slot → its symbol (bits 0–7), the symbol's frequency − 1 (bits 8–19)
    // and cumulative frequency (bits 20–31).
    let mut lut = vec![0u32; M as usize];
    for s in 0..256 {
        for slot in t.cum[s]..t.cum[s + 1] {
            lut[slot as usize] = s as u32 | (t.freq[s] - 1) << 8 | t.cum[s] << 20;
        }
    }
    let words = &stream[h.words_at..];
    let n_words = words.len() / 2;
    let mut next = 0usize;
    let mut x = h.states;
    let step = |x: &mut u32, next: &mut usize| -> Result<u8, CodecError> {
        let slot = *x & (M - 1);
        let e = lut[slot as usize];
        let (f, c) = ((e >> 8 & 0xfff) + 1, e >> 20);
        *x = f * (*x >> PROB_BITS) + slot - c;
        if *x < RANS_L {
            if *next >= n_words {
                return Err(corrupt("out of words"));
            }
            let w = u16::from_le_bytes([words[2 * *next], words[2 * *next + 1]]);
            *next += 1;
            *x = (*x << 16) | u32::from(w);
        }
        Ok(e as u8)
    };
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd && avx512::available() {
        // SAFETY: the CPU has the features; the function reads only inside
        // `lut` (slots < M), `words` (`next + LANES ≤ n_words` checked per
        // group) and writes inside `out`.
        done = unsafe { avx512::decode_groups(&lut, words, n_words, &mut x, out, &mut next) };
    }
    if done == 0 {
        // Portable: whole groups while a group's words are surely there.
        while done + LANES <= out.len() && next + LANES <= n_words {
            let o = &mut out[done..done + LANES];
            for l in 0..LANES {
                let slot = x[l] & (M - 1);
                let e = lut[slot as usize];
                let (f, c) = ((e >> 8 & 0xfff) + 1, e >> 20);
                let y = f * (x[l] >> PROB_BITS) + slot - c;
                x[l] = if y < RANS_L {
                    let w = u16::from_le_bytes([words[2 * next], words[2 * next + 1]]);
                    next += 1;
                    (y << 16) | u32::from(w)
                } else {
                    y
                };
                o[l] = e as u8;
            }
            done += LANES;
        }
    }
    // The rest, every read checked. `done` is a multiple of LANES, so
    // symbol `done + k` belongs to lane `k mod LANES`.
    for (k, o) in out[done..].iter_mut().enumerate() {
        *o = step(&mut x[k % LANES], &mut next)?;
    }
    finish(&x, next, n_words)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{LANES, PROB_BITS, RANS_L};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("TPDE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vbmi2")
        })
    }

    /// One vector of 16 lanes: decodes a symbol in each, and renormalizes
    /// the lanes that need it from the words at `*at` (expanded in lane
    /// order). Returns the symbols' low bytes.
    #[inline(always)]
    unsafe fn step(xs: &mut __m512i, lut: *const u32, words: *const u8, at: &mut usize) -> __m128i {
        let m12 = _mm512_set1_epi32((1 << PROB_BITS) - 1);
        let slot = _mm512_and_si512(*xs, m12);
        let e = _mm512_i32gather_epi32::<4>(slot, lut as _);
        let f = _mm512_add_epi32(
            _mm512_and_si512(_mm512_srli_epi32::<8>(e), m12),
            _mm512_set1_epi32(1),
        );
        let c = _mm512_srli_epi32::<20>(e);
        let y = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_mullo_epi32(f, _mm512_srli_epi32::<12>(*xs)), slot),
            c,
        );
        let m = _mm512_cmplt_epu32_mask(y, _mm512_set1_epi32(RANS_L as i32));
        let w = _mm512_cvtepu16_epi32(_mm256_maskz_expandloadu_epi16(m, words.add(2 * *at) as _));
        *xs = _mm512_mask_or_epi32(y, m, _mm512_slli_epi32::<16>(y), w);
        *at += m.count_ones() as usize;
        _mm512_cvtepi32_epi8(e)
    }

    /// Decodes whole groups of `LANES` symbols while a group's words are
    /// surely there (a group reads at most `LANES` words); returns how
    /// many symbols it wrote.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2")]
    pub unsafe fn decode_groups(
        lut: &[u32],
        words: &[u8],
        n_words: usize,
        x: &mut [u32; LANES],
        out: &mut [u8],
        next: &mut usize,
    ) -> usize {
        debug_assert_eq!(lut.len(), 1 << PROB_BITS);
        let mut a = _mm512_loadu_si512(x.as_ptr() as _);
        let mut b = _mm512_loadu_si512(x.as_ptr().add(16) as _);
        let mut done = 0;
        while done + LANES <= out.len() && *next + LANES <= n_words {
            let sa = step(&mut a, lut.as_ptr(), words.as_ptr(), next);
            let sb = step(&mut b, lut.as_ptr(), words.as_ptr(), next);
            _mm_storeu_si128(out.as_mut_ptr().add(done) as _, sa);
            _mm_storeu_si128(out.as_mut_ptr().add(done + 16) as _, sb);
            done += LANES;
        }
        _mm512_storeu_si512(x.as_mut_ptr() as _, a);
        _mm512_storeu_si512(x.as_mut_ptr().add(16) as _, b);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> u64 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *s >> 33
    }

    /// Inputs of many shapes: empty, one symbol, uniform, skewed, extreme.
    fn inputs() -> Vec<Vec<u8>> {
        let mut s = 7;
        let mut v = vec![
            vec![],
            vec![42],
            vec![0; 1000],
            vec![255; 9],
            (0..=255u8).collect(),
            (0..100_000).map(|_| lcg(&mut s) as u8).collect(),
        ];
        // Geometric: most bytes small.
        v.push(
            (0..50_000)
                .map(|_| (lcg(&mut s) % 1024).trailing_zeros().min(255) as u8)
                .collect(),
        );
        // One rare symbol among 100,000 of another.
        let mut rare = vec![3u8; 100_000];
        rare[77_777] = 200;
        v.push(rare);
        // Every length around the lane count.
        for n in 1..=2 * LANES + 1 {
            v.push((0..n).map(|_| (lcg(&mut s) % 5) as u8).collect());
        }
        v
    }

    #[test]
    fn round_trips_and_the_reference_agrees() {
        for data in inputs() {
            let z = encode(&data);
            let mut a = vec![0u8; data.len()];
            let mut b = vec![0u8; data.len()];
            let mut c = vec![0u8; data.len()];
            decode(&z, &mut a).unwrap();
            decode_reference(&z, &mut b).unwrap();
            decode_portable(&z, &mut c).unwrap();
            assert_eq!(a, data, "fast, {} bytes", data.len());
            assert_eq!(b, data, "reference, {} bytes", data.len());
            assert_eq!(c, data, "portable, {} bytes", data.len());
        }
    }

    #[test]
    fn coded_size_is_close_to_the_entropy() {
        let mut s = 1;
        // Bytes from a skewed distribution: entropy well below 8 bits.
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                let r = lcg(&mut s) % 100;
                match r {
                    0..=59 => 0,
                    60..=84 => 1,
                    85..=94 => 2,
                    _ => (3 + lcg(&mut s) % 50) as u8,
                }
            })
            .collect();
        let mut counts = [0u64; 256];
        for &b in &data {
            counts[b as usize] += 1;
        }
        let n = data.len() as f64;
        let h: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| -(c as f64) * (c as f64 / n).log2())
            .sum();
        let z = encode(&data);
        let bits = (z.len() * 8) as f64;
        assert!(
            bits < h * 1.01 + 2048.0,
            "{bits} bits for {h} bits of entropy"
        );
        // A single-symbol stream needs no words.
        let z = encode(&[9u8; 10_000]);
        assert!(z.len() < 4 + 2 + 2 + 4 * LANES + 1, "{}", z.len());
    }

    #[test]
    fn normalized_tables_sum_and_keep_every_symbol() {
        let mut s = 3;
        for _ in 0..200 {
            let mut counts = [0u64; 256];
            let k = 1 + lcg(&mut s) % 256;
            for _ in 0..k {
                counts[(lcg(&mut s) % 256) as usize] +=
                    1 + lcg(&mut s) % 1_000_000 * (lcg(&mut s) % 2);
            }
            let t = Table::from_counts(&counts);
            assert_eq!(t.cum[256], M);
            for (c, f) in counts.iter().zip(t.freq) {
                assert_eq!(*c > 0, f > 0);
            }
        }
    }

    #[test]
    fn damaged_streams_are_errors_not_panics() {
        let mut s = 11;
        for data in inputs() {
            let z = encode(&data);
            let mut out = vec![0u8; data.len()];
            // Truncations: every one of the header, and some of the rest.
            let cuts: Vec<usize> = (0..z.len().min(64))
                .chain((0..32).map(|_| (lcg(&mut s) as usize) % z.len()))
                .collect();
            for cut in cuts {
                assert!(decode(&z[..cut], &mut out).is_err(), "cut at {cut}");
                assert!(decode_reference(&z[..cut], &mut out).is_err());
            }
            // A wrong length is refused up front.
            let mut longer = vec![0u8; data.len() + 1];
            assert!(decode(&z, &mut longer).is_err());
            // Random byte damage: the fast decoder and the reference agree
            // on whether it is caught, and a caught one writes no panic.
            for _ in 0..if data.len() > 10_000 { 20 } else { 200 } {
                let mut bad = z.clone();
                let i = (lcg(&mut s) as usize) % bad.len();
                bad[i] ^= 1 + (lcg(&mut s) % 255) as u8;
                let mut a = vec![0u8; data.len()];
                let mut b = vec![0u8; data.len()];
                let mut c = vec![0u8; data.len()];
                let ra = decode(&bad, &mut a);
                let rb = decode_reference(&bad, &mut b);
                let rc = decode_portable(&bad, &mut c);
                assert_eq!(ra.is_ok(), rb.is_ok(), "the decoders differ on damage");
                assert_eq!(rc.is_ok(), rb.is_ok(), "the decoders differ on damage");
                if ra.is_ok() {
                    assert_eq!(a, b);
                    assert_eq!(c, b);
                }
            }
        }
    }
}
