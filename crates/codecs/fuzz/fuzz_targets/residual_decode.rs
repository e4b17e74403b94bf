//! The exact residual's decoders on damaged input: a chunk quantized and
//! encoded from values the input chooses, then its base codes, scales or
//! residual bytes changed where the input says. The fast decoder (class
//! counts from the frames, checked while rebuilding, AVX-512 gather reading
//! from clamped cursors) and the reference decoder (counts from the base
//! first) must agree: the same error-or-not, the same bytes when both
//! succeed; and neither may panic or read out of bounds. Chunks of both
//! residual kinds, `exact-v2` ones also with every stream split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpde_codecs::{base, residual, BaseCodec, BaseLayout, FloatDtype};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let dtype = [
        FloatDtype::BF16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::F64,
    ][usize::from(data[0] % 4)];
    let codec = if data[1] % 4 == 0 {
        BaseCodec::Q8
    } else {
        BaseCodec::Q4
    };
    // Mostly groups of 64 over whole multiples (the SIMD paths), sometimes
    // odd shapes (tails, odd groups).
    let group = [64usize, 64, 64, 32, 7][usize::from(data[2] % 5)];
    let cols = [64usize, 128, 192, 100, 3][usize::from(data[3] % 5)];
    let rows = 1 + usize::from(data[4] % 6);
    let layout = BaseLayout { codec, group, cols };
    let w = dtype.width();
    // Values: the input's bytes, repeated to fill the chunk.
    let payload = &data[8..];
    if payload.is_empty() {
        return;
    }
    let n = rows * cols * w;
    let src: Vec<u8> = (0..n).map(|i| payload[i % payload.len()] ^ (i as u8).wrapping_mul(29)).collect();
    let mut hot = vec![0u8; rows * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    // The residual kind, and for exact-v2 the writer's choice of split
    // streams or every stream split (the writer splits only planes of
    // thousands of bytes, larger than these chunks).
    let (kind, every) = match (data[1] / 4) % 3 {
        0 => (residual::Kind::V1, false),
        1 => (residual::Kind::V2, false),
        _ => (residual::Kind::V2, true),
    };
    let mut cold = if every {
        residual::encode_every_stream_split(dtype, &layout, &src, &hot, 1)
    } else {
        residual::encode(dtype, &layout, &src, &hot, 1, kind)
    }
    .expect("encode");
    // The undamaged chunk round trips.
    let mut out = vec![0u8; n];
    residual::decode(dtype, &layout, &hot, &cold, &mut out, kind).expect("valid chunk");
    assert!(out == src);
    // Damage: up to three edits, each in the base or in the residual.
    let edits = usize::from(data[5] % 4);
    for k in 0..edits {
        let x = usize::from(data[6]) * 257 + usize::from(data[7]) * 31 + k * 7919;
        let v = payload[(k * 13) % payload.len()] | 1;
        if (x + k) % 2 == 0 && !hot.is_empty() {
            let at = x % hot.len();
            hot[at] ^= v;
        } else if !cold.is_empty() {
            let at = x % cold.len();
            cold[at] ^= v;
        }
    }
    let mut fast = vec![0u8; n];
    let mut reference = vec![0u8; n];
    let a = residual::decode(dtype, &layout, &hot, &cold, &mut fast, kind);
    let b = residual::decode_reference(dtype, &layout, &hot, &cold, &mut reference, kind);
    assert_eq!(a.is_ok(), b.is_ok(), "fast {a:?}, reference {b:?}");
    if b.is_ok() {
        assert!(fast == reference);
    }
});
