//! How small can an entropy coder make a container? Empirical order-0
//! entropies, in bits per weight, of a safetensors model's 2-D BF16/F16
//! tensors (those tpde decomposes) under a q4 base (group 64), with and
//! without contexts: what the raw values cost, what the base and the exact
//! residual cost given the base code and the group scale's exponent. Each
//! context's coding table is charged too (12 bits per distinct symbol, a
//! rough description cost), so that many sparse contexts do not look free.
//!
//! ```sh
//! cargo run --release -p tpde-pack --example residual_entropy -- model.safetensors [GROUP]
//! ```
//!
//! A planning tool for the entropy-coding issue: the sizes a coder can
//! reach, before any coder is written.

use std::collections::HashMap;
use tpde_codecs::{base, residual, BaseCodec, BaseLayout, FloatDtype};

/// Bits per table entry charged for each distinct (context, symbol).
const TABLE_BITS: f64 = 12.0;

/// Histograms of symbols per context.
#[derive(Default)]
struct Model {
    counts: HashMap<(u32, u32), u64>,
    n: u64,
}

impl Model {
    fn add(&mut self, ctx: u32, sym: u32) {
        *self.counts.entry((ctx, sym)).or_insert(0) += 1;
        self.n += 1;
    }

    /// Bits per symbol: the empirical conditional entropy, and the same
    /// with the tables charged.
    fn bits(&self) -> (f64, f64) {
        let mut per_ctx: HashMap<u32, u64> = HashMap::new();
        for (&(c, _), &k) in &self.counts {
            *per_ctx.entry(c).or_insert(0) += k;
        }
        let mut h = 0.0;
        for (&(c, _), &k) in &self.counts {
            let p = k as f64 / per_ctx[&c] as f64;
            h -= k as f64 * p.log2();
        }
        let n = self.n.max(1) as f64;
        let table = self.counts.len() as f64 * TABLE_BITS;
        (h / n, (h + table) / n)
    }
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: residual_entropy MODEL.safetensors [GROUP]");
        std::process::exit(2);
    };
    let group: usize = match std::env::args().nth(2).map(|g| g.parse()) {
        None => 64,
        Some(Ok(g)) if g > 0 && g <= 4096 => g,
        Some(_) => {
            eprintln!("GROUP: a group size in 1..=4096");
            std::process::exit(2);
        }
    };
    let data = std::fs::read(&path).expect("read the model file");
    let (header, _) = tpde_ingest::safetensors::read_header(&data[..], data.len() as u64)
        .expect("safetensors header");
    let mut raw = Model::default(); // the value itself
    let mut raw_hi = Model::default(); // sign and exponent byte, then the low byte given it
    let mut raw_lo = Model::default();
    let mut q0 = Model::default(); // base code
    let mut q_ed = Model::default(); // base code given the scale's exponent
    let mut scale = Model::default(); // scale bits given the previous scale's exponent
    let mut z0 = Model::default(); // residual, no context
    let mut z_class = Model::default(); // residual given |q| (today's stream split)
    let mut z_q = Model::default(); // residual given q
    let mut z_q_ed = Model::default(); // residual given q and the scale's exponent
    let mut x_q_ed = Model::default(); // value given q and the scale's exponent
    let mut x_ed = Model::default(); // value given the scale's exponent
    let mut x_t = Model::default(); // value given its tensor
    let mut x_t_ed = Model::default(); // value given its tensor and the scale's exponent
    let mut z_t_q_ed = Model::default(); // residual given tensor, q, scale exponent
    let mut q_t_ed = Model::default(); // q given tensor, scale exponent
    let mut tensor_no = 0u32;
    let mut x_prev = Model::default(); // value given the previous value's high byte (same row)
    let mut x_up = Model::default(); // value given the high byte of the value above (same column)
    let mut x_ed_prev = Model::default(); // value given the scale's exponent and the previous value's exponent
    let mut z_q_d4 = Model::default(); // residual given q, the scale's exponent and 2 mantissa bits
    let mut n_weights = 0u64;
    let mut bytes = 0u64;
    let mut width = 0usize;
    for t in &header.tensors {
        let Some(dtype) = FloatDtype::from_name(t.dtype.name()) else {
            continue;
        };
        if dtype.width() != 2 || t.shape.len() < 2 || t.numel() < 4096 {
            continue;
        }
        width = dtype.width();
        let cols = *t.shape.last().expect("2-D") as usize;
        let layout = BaseLayout {
            codec: BaseCodec::Q4,
            group,
            cols,
        };
        let src =
            &data[(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize];
        let rows = src.len() / dtype.width() / cols;
        let mut hot = vec![0u8; rows * layout.row_bytes()];
        base::quantize(dtype, &layout, src, &mut hot);
        bytes += src.len() as u64;
        tensor_no += 1;
        let mut prev_ed = 0u32;
        for r in 0..rows {
            let row = &hot[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
            let mut at = 0;
            let mut col = 0;
            while col < cols {
                let n = group.min(cols - col);
                let blk = &row[at..at + layout.block_bytes(n)];
                at += blk.len();
                let d = base::block_scale(blk);
                let ed = u32::from((d.to_bits() >> 10) & 0x1f);
                scale.add(prev_ed, u32::from(d.to_bits()));
                prev_ed = ed;
                for i in 0..n {
                    let e = r * cols + col + i;
                    let x = dtype.load_bits(src, e);
                    let q = base::block_code(BaseCodec::Q4, &blk[2..], i);
                    let p = dtype.predict_bits(q, d);
                    let z = residual::residual_of(dtype, x, p) as u32;
                    let qs = (q + 8) as u32;
                    raw.add(0, x as u32);
                    raw_hi.add(0, (x >> 8) as u32);
                    raw_lo.add((x >> 8) as u32, (x & 0xff) as u32);
                    q0.add(0, qs);
                    q_ed.add(ed, qs);
                    z0.add(0, z);
                    z_class.add(q.unsigned_abs(), z);
                    z_q.add(qs, z);
                    z_q_ed.add(qs << 5 | ed, z);
                    x_q_ed.add(qs << 5 | ed, x as u32);
                    x_ed.add(ed, x as u32);
                    let prev = if col + i > 0 {
                        dtype.load_bits(src, e - 1)
                    } else {
                        0
                    };
                    let up = if r > 0 {
                        dtype.load_bits(src, e - cols)
                    } else {
                        0
                    };
                    let pe = ((prev >> 7) & 0xff) as u32;
                    x_prev.add((prev >> 8) as u32, x as u32);
                    x_up.add((up >> 8) as u32, x as u32);
                    x_ed_prev.add(ed << 8 | pe, x as u32);
                    x_t.add(tensor_no, x as u32);
                    x_t_ed.add(tensor_no << 5 | ed, x as u32);
                    z_t_q_ed.add(tensor_no << 9 | qs << 5 | ed, z);
                    q_t_ed.add(tensor_no << 5 | ed, qs);
                    let dm = u32::from((d.to_bits() >> 8) & 3);
                    z_q_d4.add(qs << 7 | ed << 2 | dm, z);
                    n_weights += 1;
                }
                col += n;
            }
        }
    }
    if n_weights == 0 {
        eprintln!("{path}: no 2-D BF16/F16 tensor of 4096 elements or more");
        std::process::exit(2);
    }
    let w = (width * 8) as f64;
    let (s_bits, s_tab) = scale.bits();
    let scale_bits = s_bits * (1.0 / group as f64);
    let scale_tab = s_tab * (1.0 / group as f64);
    println!(
        "{path}: {n_weights} weights in 2-D {}-bit tensors ({bytes} bytes), q4 base, group {group}",
        width * 8
    );
    println!("bits per weight: empirical order-0 entropy given the context | with tables charged ({TABLE_BITS} bits per distinct (context, symbol)) | share of the original");
    let row = |name: &str, (h, t): (f64, f64)| {
        println!("  {name:<52} {h:7.3} | {t:7.3} | {:5.1} %", t / w * 100.0);
    };
    row("value, order 0", raw.bits());
    let (a, b) = (raw_hi.bits(), raw_lo.bits());
    row(
        "value: high byte, then low byte given it",
        (a.0 + b.0, a.1 + b.1),
    );
    row("base code q", q0.bits());
    row("base code q given the scale's exponent", q_ed.bits());
    row(
        "scale (per group, given the previous exponent)",
        (scale_bits, scale_tab),
    );
    row("residual, order 0", z0.bits());
    row(
        "residual given |q| (the present stream split)",
        z_class.bits(),
    );
    row("residual given q", z_q.bits());
    row("residual given q and the scale's exponent", z_q_ed.bits());
    row("value given q and the scale's exponent", x_q_ed.bits());
    row("value given the scale's exponent", x_ed.bits());
    row(
        "value given the previous value's high byte (row)",
        x_prev.bits(),
    );
    row("value given the high byte above (column)", x_up.bits());
    row(
        "value given the scale's and the previous value's exponents",
        x_ed_prev.bits(),
    );
    row("value given its tensor", x_t.bits());
    row(
        "value given its tensor and the scale's exponent",
        x_t_ed.bits(),
    );
    row(
        "base code given its tensor and the scale's exponent",
        q_t_ed.bits(),
    );
    row(
        "residual given its tensor, q and the scale's exponent",
        z_t_q_ed.bits(),
    );
    row(
        "residual given q, the scale's exponent and 2 mantissa bits",
        z_q_d4.bits(),
    );
    let q = q_ed.bits();
    let z = z_q_ed.bits();
    row(
        "total: q | exp(d) + scale + residual | q, exp(d)",
        (q.0 + scale_bits + z.0, q.1 + scale_tab + z.1),
    );
    let raw_scale = 16.0 / group as f64;
    row(
        "total with q and scales stored raw (4 + 16/g bits)",
        (4.0 + raw_scale + z.0, 4.0 + raw_scale + z.1),
    );
}
