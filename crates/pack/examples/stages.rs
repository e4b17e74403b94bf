use std::time::Instant;
use tpde_codecs::{base, residual, BaseCodec, BaseLayout, FloatDtype};
fn main() {
    let decode_only = std::env::var("DECODE_ONLY").is_ok();
    let path = std::env::args().nth(1).unwrap();
    let data = std::fs::read(&path).unwrap();
    let (h, _) = tpde_ingest::safetensors::read_header(&data[..], data.len() as u64).unwrap();
    let mut items = vec![];
    for t in &h.tensors {
        let Some(dt) = FloatDtype::from_name(t.dtype.name()) else {
            continue;
        };
        if t.shape.len() < 2 {
            continue;
        }
        let cols = *t.shape.last().unwrap() as usize;
        let src = &data[(h.data_start + t.begin) as usize..(h.data_start + t.end) as usize];
        let rows_per = (262144 / cols).max(1);
        for ch in src.chunks(rows_per * cols * dt.width()) {
            items.push((dt, cols, ch));
        }
    }
    let total: usize = items.iter().map(|i| i.2.len()).sum();
    let mb = |t: f64| total as f64 / t / 1e6;
    let t = Instant::now();
    let mut hots = vec![];
    for (dt, cols, src) in &items {
        let l = BaseLayout {
            codec: BaseCodec::Q4,
            group: 64,
            cols: *cols,
        };
        let mut hot = vec![0u8; src.len() / dt.width() / cols * l.row_bytes()];
        base::quantize(*dt, &l, src, &mut hot);
        hots.push(hot);
    }
    println!("quantize     {:8.0} MB/s", mb(t.elapsed().as_secs_f64()));
    for lvl in if decode_only { vec![3] } else { vec![1, 3] } {
        let t = Instant::now();
        let mut colds = vec![];
        for ((dt, cols, src), hot) in items.iter().zip(&hots) {
            let l = BaseLayout {
                codec: BaseCodec::Q4,
                group: 64,
                cols: *cols,
            };
            colds.push(residual::encode(*dt, &l, src, hot, lvl).unwrap());
        }
        let csize: usize = colds.iter().map(|c| c.len()).sum();
        println!(
            "encode L{lvl}    {:8.0} MB/s  ratio {:.3}",
            mb(t.elapsed().as_secs_f64()),
            csize as f64 / total as f64
        );
        let reps = if decode_only { 20 } else { 1 };
        let t = Instant::now();
        for _ in 0..reps {
            for (((dt, cols, src), hot), cold) in items.iter().zip(&hots).zip(&colds) {
                let l = BaseLayout {
                    codec: BaseCodec::Q4,
                    group: 64,
                    cols: *cols,
                };
                let mut out = vec![0u8; src.len()];
                residual::decode(*dt, &l, hot, cold, &mut out).unwrap();
            }
        }
        println!(
            "decode L{lvl}    {:8.0} MB/s",
            mb(t.elapsed().as_secs_f64() / reps as f64)
        );
        let t = Instant::now();
        let mut outn = 0usize;
        for cold in &colds {
            let ns = 18;
            let mut at = ns * 4;
            for i in 0..ns {
                let len = u32::from_le_bytes(cold[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
                if len > 0 {
                    let f = &cold[at..at + len];
                    let n = zstd_safe::get_frame_content_size(f).unwrap().unwrap() as usize;
                    let mut o = vec![0u8; n];
                    residual::zstd_decompress_exact(f, &mut o).unwrap();
                    outn += n;
                }
                at += len;
            }
        }
        println!(
            "  zstd part  {:8.0} MB/s (of original) {outn}",
            mb(t.elapsed().as_secs_f64())
        );
    }
    let t = Instant::now();
    let mut x = 0u64;
    for (_, _, src) in &items {
        x ^= tpde_codecs::xxh3(src);
    }
    println!(
        "xxh3         {:8.0} MB/s {x}",
        mb(t.elapsed().as_secs_f64())
    );
    let t = Instant::now();
    let mut hh = blake3::Hasher::new();
    for (_, _, src) in &items {
        hh.update(src);
    }
    println!(
        "blake3       {:8.0} MB/s {}",
        mb(t.elapsed().as_secs_f64()),
        hh.finalize().to_hex().len()
    );
}
