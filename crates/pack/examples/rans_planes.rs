//! The residual's streams coded with rANS against zstd -3, on a real
//! safetensors model: bits per weight and single-thread speed.
//!
//! The streams are those of the exact residual today (`exact-v1`): per
//! chunk of about 2^18 elements, one stream per (class of the base code,
//! byte plane of the zigzagged residual). Each is coded by zstd at level 3
//! and by `tpde_codecs::rans`, and decoded back (checked); the speeds are
//! MB/s of the residual's bytes (two per BF16 weight). The hot tier's codes are
//! coded by rANS too (the scales as stored), in M codes/s.
//!
//! ```sh
//! cargo run --release -p tpde-pack --example rans_planes -- model.safetensors
//! ```

use std::time::Instant;
use tpde_codecs::{base, rans, residual, BaseCodec, BaseLayout, FloatDtype};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: rans_planes MODEL.safetensors");
        std::process::exit(2);
    };
    let data = std::fs::read(&path).expect("read the model file");
    let (header, _) = tpde_ingest::safetensors::read_header(&data[..], data.len() as u64)
        .expect("safetensors header");
    let codec = BaseCodec::Q4;
    let mut streams: Vec<Vec<u8>> = Vec::new();
    // The hot tier's codes (q + 8, one byte each) per chunk, and its bytes as stored.
    let mut codes: Vec<Vec<u8>> = Vec::new();
    let mut hot_bytes = 0usize;
    let mut weights = 0usize;
    for t in &header.tensors {
        let Some(dtype) = FloatDtype::from_name(t.dtype.name()) else {
            continue;
        };
        if dtype.width() != 2 || t.shape.len() < 2 || t.numel() < 4096 {
            continue;
        }
        let cols = *t.shape.last().expect("2-D") as usize;
        let layout = BaseLayout {
            codec,
            group: 64,
            cols,
        };
        let src =
            &data[(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize];
        for chunk in src.chunks((262_144 / cols).max(1) * cols * 2) {
            let rows = chunk.len() / 2 / cols;
            let mut hot = vec![0u8; rows * layout.row_bytes()];
            base::quantize(dtype, &layout, chunk, &mut hot);
            hot_bytes += hot.len();
            let mut chunk_codes = Vec::with_capacity(rows * cols);
            let classes = residual::class_count(codec);
            let mut planes: Vec<[Vec<u8>; 2]> = (0..classes).map(|_| Default::default()).collect();
            for r in 0..rows {
                let row = &hot[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
                let (mut at, mut col) = (0, 0);
                while col < cols {
                    let n = layout.group.min(cols - col);
                    let blk = &row[at..at + layout.block_bytes(n)];
                    at += blk.len();
                    let d = base::block_scale(blk);
                    for i in 0..n {
                        let e = r * cols + col + i;
                        let q = base::block_code(codec, &blk[2..], i);
                        chunk_codes.push((q + 8) as u8);
                        let p = dtype.predict_bits(q, d);
                        let z = residual::residual_of(dtype, dtype.load_bits(chunk, e), p);
                        let c = residual::class_of(codec, q);
                        planes[c][0].push(z as u8);
                        planes[c][1].push((z >> 8) as u8);
                    }
                    col += n;
                }
            }
            weights += rows * cols;
            codes.push(chunk_codes);
            for [lo, hi] in planes {
                streams.push(lo);
                streams.push(hi);
            }
        }
    }
    let bytes: usize = streams.iter().map(|s| s.len()).sum();
    let mb = |secs: f64| bytes as f64 / secs / 1e6;
    let bits = |n: usize| n as f64 * 8.0 / weights as f64;

    let t = Instant::now();
    let z: Vec<Vec<u8>> = streams
        .iter()
        .map(|s| residual::zstd_compress(s, 3).expect("zstd"))
        .collect();
    let z_enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (c, s) in z.iter().zip(&streams) {
        let mut out = vec![0u8; s.len()];
        if !s.is_empty() {
            residual::zstd_decompress_exact(c, &mut out).expect("zstd decode");
        }
    }
    let z_dec = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let r: Vec<Vec<u8>> = streams.iter().map(|s| rans::encode(s)).collect();
    let r_enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (c, s) in r.iter().zip(&streams) {
        let mut out = vec![0u8; s.len()];
        rans::decode(c, &mut out).expect("rans decode");
        assert!(out == *s, "rans round trip");
    }
    let r_dec = t.elapsed().as_secs_f64();

    // The hot tier: its codes coded by rANS (the scales would stay as they
    // are: 16 bits a group), decoded and checked.
    let code_bytes: usize = codes.iter().map(|c| c.len()).sum();
    let t = Instant::now();
    let hc: Vec<Vec<u8>> = codes.iter().map(|c| rans::encode(c)).collect();
    let h_enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (z, c) in hc.iter().zip(&codes) {
        let mut out = vec![0u8; c.len()];
        rans::decode(z, &mut out).expect("rans decode");
        assert!(out == *c, "rans round trip");
    }
    let h_dec = t.elapsed().as_secs_f64();
    let hs: usize = hc.iter().map(|c| c.len()).sum();
    let scale_bits = 16.0 / 64.0;
    let zs: usize = z.iter().map(|c| c.len()).sum();
    let rs: usize = r.iter().map(|c| c.len()).sum();
    println!(
        "{path}: {weights} weights, {} residual streams, {bytes} bytes",
        streams.len()
    );
    println!(
        "coder      bits/weight  encode MB/s  decode MB/s   (one thread, MB of residual bytes)"
    );
    println!(
        "zstd -3    {:>11.3}  {:>11.0}  {:>11.0}",
        bits(zs),
        mb(z_enc),
        mb(z_dec)
    );
    println!(
        "rans       {:>11.3}  {:>11.0}  {:>11.0}",
        bits(rs),
        mb(r_enc),
        mb(r_dec)
    );
    println!(
        "hot tier: stored {:.3} bits/weight; codes by rans {:.3} + scales {scale_bits:.3} = {:.3}; {:.0} / {:.0} M codes/s encode / decode",
        bits(hot_bytes),
        bits(hs),
        bits(hs) + scale_bits,
        code_bytes as f64 / h_enc / 1e6,
        code_bytes as f64 / h_dec / 1e6
    );
}
