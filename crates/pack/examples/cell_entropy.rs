//! What a *cell model* could reach on a BF16 model: the ideal size of a
//! container that stores the q4 base (q coded given the scale's exponent,
//! plus the scales) and the exact value given the base, where the value's
//! distribution given (q, d) is the value histogram of its context restricted
//! to the quantization cell of q under the exact scale d, and to the
//! magnitudes the scale allows (no element of a group exceeds the largest
//! one, which set d).
//!
//! ```sh
//! cargo run --release -p tpde-pack --example cell_entropy -- model.safetensors
//! ```
//!
//! A planning tool for the entropy-coding issue, next to `residual_entropy`.

use half::f16;
use std::collections::HashMap;
use tpde_codecs::{base, BaseCodec, BaseLayout, FloatDtype};

const GROUP: usize = 64;
/// The key of +∞ (NaNs lie beyond).
const KMAX: u32 = 0xFF80;

fn key(b: u16) -> u32 {
    u32::from(if b & 0x8000 != 0 { !b } else { b | 0x8000 })
}
fn unkey(k: u32) -> u16 {
    let k = k as u16;
    if k & 0x8000 != 0 {
        k & 0x7fff
    } else {
        !k
    }
}
fn val(k: u32) -> f32 {
    f32::from_bits(u32::from(unkey(k)) << 16)
}

/// First key in `[lo, hi]` where `pred` holds (`hi + 1` if none); `pred`
/// must be monotone (false … true).
fn first(lo: u32, hi: u32, pred: impl Fn(u32) -> bool) -> u32 {
    let (mut a, mut b) = (lo, hi + 1);
    while a < b {
        let m = (a + b) / 2;
        if pred(m) {
            b = m
        } else {
            a = m + 1
        }
    }
    a
}

/// The key range of each code 0..16 (q + 8) under scale `d`, restricted to
/// the magnitudes `d` allows.
fn cells(d: f16) -> [(u32, u32); 16] {
    let df = d.to_f32();
    // |x| ≤ B: the largest magnitude whose scale rounds to no more than |d|.
    let ad = df.abs();
    let bound_key = first(0x8000, KMAX, |k| {
        f16::from_f32((val(k) / 8.0).min(65504.0)).to_f32() > ad
    }) - 1;
    let bound = val(bound_key);
    let lo_k = key(half::bf16::from_f32(-bound).to_bits());
    let (lo, hi) = (lo_k, bound_key);
    let mut out = [(1, 0); 16];
    if df == 0.0 {
        out[8] = (lo, hi);
        return out;
    }
    let code = |k: u32| base::quantize_value(BaseCodec::Q4, val(k), d);
    // Codes are monotone in the value: increasing for d > 0, decreasing for d < 0.
    let up = df > 0.0;
    for q in -8..=7i32 {
        let (a, b) = if up {
            (
                first(lo, hi, |k| code(k) >= q),
                first(lo, hi, |k| code(k) > q),
            )
        } else {
            (
                first(lo, hi, |k| code(k) <= q),
                first(lo, hi, |k| code(k) < q),
            )
        };
        out[(q + 8) as usize] = (a, b.wrapping_sub(1));
    }
    out
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: cell_entropy MODEL.safetensors");
        std::process::exit(2);
    };
    let data = std::fs::read(&path).expect("read the model file");
    let (header, _) = tpde_ingest::safetensors::read_header(&data[..], data.len() as u64)
        .expect("safetensors header");
    let dtype = FloatDtype::BF16;
    // Pass 1: quantize, keep (x, q, d) and the histograms.
    let mut elems: Vec<(u16, i8, u16, bool)> = Vec::new();
    let mut hist = vec![vec![0u64; 65536]; 32]; // value keys per scale exponent
    let mut qh = vec![[0u64; 17]; 32]; // q + 8, and 16 for the element that set the scale
    let mut scales: HashMap<(u32, u16), u64> = HashMap::new();
    let mut groups = 0u64;
    for t in &header.tensors {
        if t.dtype.name() != "BF16" || t.shape.len() < 2 || t.numel() < 4096 {
            continue;
        }
        let cols = *t.shape.last().expect("2-D") as usize;
        let layout = BaseLayout {
            codec: BaseCodec::Q4,
            group: GROUP,
            cols,
        };
        let src =
            &data[(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize];
        let rows = src.len() / 2 / cols;
        let mut hot = vec![0u8; rows * layout.row_bytes()];
        base::quantize(dtype, &layout, src, &mut hot);
        let mut prev_ed = 0u32;
        for r in 0..rows {
            let row = &hot[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
            let (mut at, mut col) = (0, 0);
            while col < cols {
                let n = GROUP.min(cols - col);
                let blk = &row[at..at + layout.block_bytes(n)];
                at += blk.len();
                let d = base::block_scale(blk);
                let ed = u32::from((d.to_bits() >> 10) & 0x1f);
                *scales.entry((prev_ed, d.to_bits())).or_insert(0) += 1;
                prev_ed = ed;
                groups += 1;
                // The element that set the scale: the first of largest finite magnitude.
                let mut imax = usize::MAX;
                let mut amax = 0.0f32;
                for i in 0..n {
                    let v = dtype
                        .bits_to_f32(dtype.load_bits(src, r * cols + col + i))
                        .abs();
                    if v.is_finite() && v > amax {
                        amax = v;
                        imax = i;
                    }
                }
                for i in 0..n {
                    let x = dtype.load_bits(src, r * cols + col + i) as u16;
                    let q = base::block_code(BaseCodec::Q4, &blk[2..], i);
                    hist[ed as usize][key(x) as usize] += 1;
                    let is_max = i == imax;
                    qh[ed as usize][if is_max { 16 } else { (q + 8) as usize }] += 1;
                    elems.push((x, q as i8, d.to_bits(), is_max));
                }
                col += n;
            }
        }
    }
    let n = elems.len() as f64;
    // Cumulative histograms, with +1/65536 smoothing so that no value in a cell has P = 0.
    let cum: Vec<Vec<f64>> = hist
        .iter()
        .map(|h| {
            let mut c = vec![0.0; 65537];
            for k in 0..65536 {
                c[k + 1] = c[k] + h[k] as f64 + 1e-3;
            }
            c
        })
        .collect();
    let mut cell_cache: HashMap<u16, [(u32, u32); 16]> = HashMap::new();
    let (mut bits_x, mut bits_q, mut bits_r) = (0.0f64, 0.0f64, 0.0f64);
    let mut r_by_q = [0.0f64; 16];
    let mut n_by_q = [0u64; 16];
    let mut outside = 0u64;
    let (mut bits_uk, mut bits_max) = (0.0f64, 0.0f64);
    for &(x, q, db, is_max) in &elems {
        let d = f16::from_bits(db);
        let ed = ((db >> 10) & 0x1f) as usize;
        let c = &cum[ed];
        let k = key(x) as usize;
        let px = c[k + 1] - c[k];
        bits_x -= (px / c[65536]).log2();
        let qi = (q + 8) as usize;
        let qt: u64 = qh[ed].iter().sum();
        bits_q -= (qh[ed][if is_max { 16 } else { qi }] as f64 / qt as f64).log2();
        let cs = cell_cache.entry(db).or_insert_with(|| cells(d));
        let (a, b) = cs[qi];
        if (k as u32) < a || k as u32 > b {
            outside += 1;
            continue;
        }
        let pc = c[b as usize + 1] - c[a as usize];
        if is_max {
            // Given d, the largest element is one of the values whose scale rounds to d.
            let ad = d.to_f32().abs();
            let mut m = 0u32;
            for kk in a..=b {
                if f16::from_f32((val(kk).abs() / 8.0).min(65504.0)).to_f32() == ad {
                    m += 1;
                }
            }
            bits_max += f64::from(m.max(1)).log2();
            continue;
        }
        bits_uk += f64::from(b - a + 1).log2();
        let r = -(px / pc).log2();
        bits_r += r;
        r_by_q[qi] += r;
        n_by_q[qi] += 1;
    }
    let mut sh = 0.0;
    let mut per_ctx: HashMap<u32, u64> = HashMap::new();
    for (&(c, _), &k) in &scales {
        *per_ctx.entry(c).or_insert(0) += k;
    }
    for (&(c, _), &k) in &scales {
        sh -= k as f64 * (k as f64 / per_ctx[&c] as f64).log2();
    }
    let scale_bits = sh / n;
    let table_bits = (scales.len() as f64 * 12.0) / n;
    println!(
        "{path}: {} BF16 weights, {groups} groups of {GROUP}, {} distinct scales",
        elems.len(),
        cell_cache.len()
    );
    if outside > 0 {
        println!("  !! {outside} values fell outside their computed cell");
    }
    println!("  value given the scale's exponent      {:7.3}", bits_x / n);
    println!("  q given the scale's exponent          {:7.3}", bits_q / n);
    println!(
        "  scales given the previous exponent    {:7.3} (+{:.3} tables)",
        scale_bits, table_bits
    );
    println!(
        "  (other values) given the cell, histogram {:7.3}",
        bits_r / n
    );
    println!(
        "  (other values) given the cell, uniform in keys  {:7.3}",
        bits_uk / n
    );
    println!(
        "  the element that set the scale, given d {:7.3}",
        bits_max / n
    );
    let tot = (bits_q + bits_r + bits_max + sh) / n;
    println!(
        "  total: q + scales + value | cell      {:7.3} bits, {:.4} x BF16 ({:.4} x with scale tables)",
        tot,
        tot / 16.0,
        (tot + table_bits) / 16.0
    );
    for qi in 0..16 {
        if n_by_q[qi] > 0 {
            println!(
                "    q = {:3}: {:9} values, {:6.3} bits each",
                qi as i32 - 8,
                n_by_q[qi],
                r_by_q[qi] / n_by_q[qi] as f64
            );
        }
    }
}
