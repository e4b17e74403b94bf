//! Single-thread throughput of each codec stage on a real safetensors file:
//! quantize, residual encode, residual decode (and its streams part alone),
//! base values (fast and reference; into a buffer as large as the model,
//! with plain stores and past the cache),
//! xxh3 and blake3, in MB/s of original bytes. A tool for tuning the
//! codecs; the end-to-end figures come from `cargo bench --bench pack`.
//!
//! ```sh
//! cargo run --release -p tpde-pack --example codec_stages -- model.safetensors [reps]
//! STAGES=decode cargo run --release -p tpde-pack --example codec_stages -- model.safetensors 50
//! RESIDUAL=exact-v1 STAGES=decode,encode cargo run … # the residual kind (default: the writer's)
//! NAMES=experts CHUNK_ELEMS=73728 cargo run …          # only some tensors, other chunk sizes
//! ```

use std::time::Instant;
use tpde_codecs::{base, residual, xxh3, BaseCodec, BaseLayout, FloatDtype};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: codec_stages MODEL.safetensors [REPS]");
        std::process::exit(2);
    };
    let reps: u32 = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let kind = match std::env::var("RESIDUAL") {
        Ok(name) => residual::Kind::from_name(&name).expect("RESIDUAL=exact-v1 or exact-v2"),
        Err(_) => residual::Kind::CURRENT,
    };
    let data = std::fs::read(&path).expect("read the model file");
    let (header, _) = tpde_ingest::safetensors::read_header(&data[..], data.len() as u64)
        .expect("safetensors header");

    // The chunks the pipeline would make: whole rows, about 2^18 elements
    // (`CHUNK_ELEMS=` to try others).
    let chunk_elems: usize = std::env::var("CHUNK_ELEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(262_144);
    // `NAMES=experts` keeps only the tensors whose names hold that text.
    let only_names = std::env::var("NAMES").unwrap_or_default();
    let mut chunks = Vec::new();
    for t in &header.tensors {
        let Some(dtype) = FloatDtype::from_name(t.dtype.name()) else {
            continue;
        };
        if t.shape.len() < 2 || t.numel() < 4096 || !t.name.contains(&only_names) {
            continue;
        }
        let cols = *t.shape.last().expect("2-D") as usize;
        let layout = BaseLayout {
            codec: BaseCodec::Q4,
            group: 64,
            cols,
        };
        let bytes =
            &data[(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize];
        for src in bytes.chunks((chunk_elems / cols).max(1) * cols * dtype.width()) {
            chunks.push((dtype, layout, src));
        }
    }
    let total: usize = chunks.iter().map(|c| c.2.len()).sum();
    // `STAGES=decode,zstd` times only the stages whose names hold one of
    // those words (the others run once, unprinted, when later ones need them).
    let only: Option<Vec<String>> = std::env::var("STAGES")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let time = |name: &str, f: &mut dyn FnMut()| {
        if let Some(only) = &only {
            if !only.iter().any(|w| name.contains(w.as_str())) {
                if matches!(name, "quantize" | "encode") {
                    f();
                }
                return;
            }
        }
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{name:<14} {:>8.0} MB/s", total as f64 / s / 1e6);
    };

    let mut hot: Vec<Vec<u8>> = chunks
        .iter()
        .map(|(d, l, s)| vec![0u8; s.len() / d.width() / l.cols * l.row_bytes()])
        .collect();
    time("quantize", &mut || {
        for ((d, l, s), h) in chunks.iter().zip(hot.iter_mut()) {
            base::quantize(*d, l, s, h);
        }
    });
    let mut cold = Vec::new();
    time("encode", &mut || {
        cold = chunks
            .iter()
            .zip(&hot)
            .map(|((d, l, s), h)| residual::encode(*d, l, s, h, 3, kind).expect("encode"))
            .collect();
    });
    let cold_bytes: usize = cold.iter().map(|c| c.len()).sum();
    let mut out = vec![0u8; chunks.iter().map(|c| c.2.len()).max().unwrap_or(0)];
    time("decode", &mut || {
        for (((d, l, s), h), c) in chunks.iter().zip(&hot).zip(&cold) {
            residual::decode(*d, l, h, c, &mut out[..s.len()], kind).expect("decode");
        }
    });
    time("base values", &mut || {
        for ((d, l, s), h) in chunks.iter().zip(&hot) {
            residual::base_values(*d, l, h, &mut out[..s.len()]).expect("base values");
        }
    });
    time("  reference", &mut || {
        for ((d, l, s), h) in chunks.iter().zip(&hot) {
            residual::base_values_reference(*d, l, h, &mut out[..s.len()]).expect("base values");
        }
    });
    // Into one buffer as large as the model (committed first, starting on
    // a cache line), as a loader's step buffers are: plain stores, then
    // stores past the cache (`residual::Stores`).
    let mut room = vec![1u8; total + 64];
    let at = room.as_ptr().align_offset(64);
    let whole = &mut room[at..at + total];
    for (name, stores) in [
        ("base, large out", residual::Stores::Cached),
        ("base, past cache", residual::Stores::PastCache),
    ] {
        time(name, &mut || {
            let mut rest = &mut whole[..];
            for ((d, l, s), h) in chunks.iter().zip(&hot) {
                let (o, tail) = std::mem::take(&mut rest).split_at_mut(s.len());
                rest = tail;
                residual::base_values_with(*d, l, h, o, stores).expect("base values");
            }
        });
    }
    // The first stage of the decoder alone: the residual's streams into
    // byte planes (zstd frames, split streams joined).
    if only
        .as_ref()
        .is_none_or(|o| o.iter().any(|w| "  streams part".contains(w.as_str())))
    {
        let mut streams = std::time::Duration::ZERO;
        for _ in 0..reps {
            for (((d, l, s), h), c) in chunks.iter().zip(&hot).zip(&cold) {
                let (z, _) = residual::decode_timed(
                    *d,
                    l,
                    h,
                    c,
                    &mut out[..s.len()],
                    kind,
                    Default::default(),
                )
                .expect("decode");
                streams += z;
            }
        }
        let per = streams.as_secs_f64() / reps as f64;
        println!(
            "{:<14} {:>8.0} MB/s",
            "  streams part",
            total as f64 / per / 1e6
        );
    }
    time("xxh3", &mut || {
        std::hint::black_box(chunks.iter().fold(0, |a, c| a ^ xxh3(c.2)));
    });
    time("blake3", &mut || {
        let mut h = blake3::Hasher::new();
        chunks.iter().for_each(|c| {
            h.update(c.2);
        });
        std::hint::black_box(h.finalize());
    });
    println!(
        "{} chunks, {:.1} MB of float matrices; hot {:.3} ×, cold {:.3} ×",
        chunks.len(),
        total as f64 / 1e6,
        hot.iter().map(|h| h.len()).sum::<usize>() as f64 / total as f64,
        cold_bytes as f64 / total as f64
    );
}
