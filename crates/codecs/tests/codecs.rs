//! Fast paths against their references, exactness on every special bit
//! pattern, and corrupt residual chunks.

use proptest::prelude::*;
use tpde_codecs::{base, residual, BaseCodec, BaseLayout, FloatDtype};

/// The residual kind the writer uses; tests of both name them.
const K: residual::Kind = residual::Kind::CURRENT;

const DTYPES: [FloatDtype; 4] = [
    FloatDtype::F16,
    FloatDtype::BF16,
    FloatDtype::F32,
    FloatDtype::F64,
];
const CODECS: [BaseCodec; 2] = [BaseCodec::Q4, BaseCodec::Q8];

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn normal_ish(&mut self) -> f64 {
        // Sum of uniforms: weight-like bell shape.
        (0..4)
            .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
            .sum::<f64>()
            * 0.05
    }
}

/// Weight-like values with a sprinkling of every special pattern.
fn weights(dtype: FloatDtype, n: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = vec![0u8; n * dtype.width()];
    let specials = special_patterns(dtype);
    for i in 0..n {
        let bits = if rng.next().is_multiple_of(17) {
            specials[(rng.next() % specials.len() as u64) as usize]
        } else {
            let v = rng.normal_ish();
            match dtype {
                FloatDtype::F16 => half::f16::from_f64(v).to_bits() as u64,
                FloatDtype::BF16 => half::bf16::from_f64(v).to_bits() as u64,
                FloatDtype::F32 => (v as f32).to_bits() as u64,
                FloatDtype::F64 => v.to_bits(),
            }
        };
        dtype.store_bits(&mut out, i, bits);
    }
    out
}

/// NaNs with payloads (quiet and signalling, both signs), ±Inf, ±0,
/// smallest and largest subnormals, largest finite, smallest normal.
fn special_patterns(dtype: FloatDtype) -> Vec<u64> {
    let s = dtype.sign_mask();
    let (exp_mask, man_bits) = match dtype {
        FloatDtype::F16 => (0x7C00u64, 10),
        FloatDtype::BF16 => (0x7F80, 7),
        FloatDtype::F32 => (0x7F80_0000, 23),
        FloatDtype::F64 => (0x7FF0_0000_0000_0000, 52),
    };
    let man = (1u64 << man_bits) - 1;
    let mut v = vec![
        0,
        s,
        exp_mask,
        exp_mask | s,
        exp_mask | 1,
        exp_mask | (1 << (man_bits - 1)) | 5,
        exp_mask | man,
        exp_mask | man | s,
        1,
        1 | s,
        man,
        man | s,
        exp_mask - 1,
        (exp_mask - 1) | s,
        1 << man_bits,
    ];
    v.dedup();
    v
}

fn layouts(cols: usize) -> Vec<BaseLayout> {
    let mut v = vec![];
    for codec in CODECS {
        for group in [1, 7, 32, 64, 128] {
            v.push(BaseLayout { codec, group, cols });
        }
    }
    v
}

fn roundtrip(dtype: FloatDtype, layout: &BaseLayout, src: &[u8]) {
    let rows = src.len() / dtype.width() / layout.cols;
    let mut hot = vec![0u8; rows * layout.row_bytes()];
    let mut hot_ref = hot.clone();
    base::quantize(dtype, layout, src, &mut hot);
    base::quantize_reference(dtype, layout, src, &mut hot_ref);
    assert_eq!(
        hot, hot_ref,
        "quantize fast != reference ({dtype:?} {layout:?})"
    );
    for kind in [residual::Kind::V1, residual::Kind::V2] {
        let cold = residual::encode(dtype, layout, src, &hot, 3, kind).unwrap();
        let cold_ref = residual::encode_reference(dtype, layout, src, &hot, 3, kind).unwrap();
        assert_eq!(
            cold, cold_ref,
            "encode fast != reference ({dtype:?} {layout:?} {kind:?})"
        );
        let mut out = vec![0u8; src.len()];
        residual::decode(dtype, layout, &hot, &cold, &mut out, kind).unwrap();
        assert!(
            out == src,
            "decode not bit-exact ({dtype:?} {layout:?} {kind:?})"
        );
        // Stored past the cache where the output lies on cache lines: at a
        // line, and off it by a half and a word.
        let mut room = vec![0x55u8; src.len() + 128];
        for shift in [0, 2, 16, 48] {
            let at = room.as_ptr().align_offset(64) + shift;
            let out = &mut room[at..at + src.len()];
            let stores = residual::Stores::PastCache;
            residual::decode_timed(dtype, layout, &hot, &cold, out, kind, stores).unwrap();
            assert!(
                *out == src[..],
                "decode past the cache not bit-exact ({dtype:?} {layout:?} {kind:?}, {shift} bytes past a line)"
            );
        }
        let mut out_ref = vec![0xAAu8; src.len()];
        residual::decode_reference(dtype, layout, &hot, &cold, &mut out_ref, kind).unwrap();
        assert!(
            out_ref == src,
            "reference decode not bit-exact ({dtype:?} {layout:?} {kind:?})"
        );
    }
    let mut base_ref = vec![0xAAu8; src.len()];
    residual::base_values_reference(dtype, layout, &hot, &mut base_ref).unwrap();
    // Both ways of storing, with the output at a cache line and off it by
    // a half and a word.
    let mut room = vec![0x55u8; src.len() + 128];
    for stores in [residual::Stores::Cached, residual::Stores::PastCache] {
        for shift in [0, 2, 16, 48] {
            let at = room.as_ptr().align_offset(64) + shift;
            let base_fast = &mut room[at..at + src.len()];
            residual::base_values_with(dtype, layout, &hot, base_fast, stores).unwrap();
            assert!(
                *base_fast == base_ref[..],
                "base_values fast != reference ({dtype:?} {layout:?} {stores:?}, {shift} bytes past a line)"
            );
        }
    }
}

#[test]
fn fast_paths_match_references_and_round_trip_exactly() {
    for dtype in DTYPES {
        for cols in [1, 2, 7, 63, 64, 65, 130] {
            for layout in layouts(cols) {
                let src = weights(dtype, cols * 5, cols as u64 * 31 + layout.group as u64);
                roundtrip(dtype, &layout, &src);
            }
        }
    }
}

#[test]
fn every_16_bit_pattern_round_trips() {
    for dtype in [FloatDtype::F16, FloatDtype::BF16] {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        for codec in CODECS {
            // 256 columns: groups mix tiny, huge, NaN and Inf neighbours.
            roundtrip(
                dtype,
                &BaseLayout {
                    codec,
                    group: 64,
                    cols: 256,
                },
                &src,
            );
        }
    }
}

#[test]
fn groups_of_only_special_values_round_trip() {
    for dtype in DTYPES {
        for &pat in &special_patterns(dtype) {
            let mut src = vec![0u8; 64 * dtype.width()];
            for i in 0..64 {
                dtype.store_bits(&mut src, i, pat);
            }
            for codec in CODECS {
                roundtrip(
                    dtype,
                    &BaseLayout {
                        codec,
                        group: 32,
                        cols: 64,
                    },
                    &src,
                );
            }
        }
    }
}

#[test]
fn q4_base_tracks_the_values() {
    // The base is a usable model: q4 error is at most half a step, except
    // on the side opposite the group's extreme, which code +7 clips to at
    // most one step; the mean error stays near a quarter step.
    let dtype = FloatDtype::F32;
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 256,
    };
    let mut rng = SplitMix(9);
    let vals: Vec<f32> = (0..1024).map(|_| rng.normal_ish() as f32).collect();
    let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut hot = vec![0u8; 4 * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    let mut deq = vec![0f32; 1024];
    base::dequantize(&layout, &hot, &mut deq);
    for (g, (a, b)) in vals.chunks(64).zip(deq.chunks(64)).enumerate() {
        let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = amax / 8.0;
        let mut sum = 0f32;
        for (x, y) in a.iter().zip(b) {
            let err = (x - y).abs();
            let clipped = (y.abs() - 7.0 * step).abs() <= 0.01 * step;
            let bound = if clipped { step } else { step * 0.5 } * 1.002;
            assert!(err <= bound, "group {g}: {x} vs {y} (step {step})");
            sum += err;
        }
        assert!(
            sum / 64.0 <= 0.3 * step,
            "group {g}: mean error {} steps",
            sum / 64.0 / step
        );
    }
}

fn sample_chunk() -> (FloatDtype, BaseLayout, Vec<u8>, Vec<u8>, Vec<u8>) {
    let dtype = FloatDtype::BF16;
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 128,
    };
    let src = weights(dtype, 128 * 8, 5);
    let mut hot = vec![0u8; 8 * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
    (dtype, layout, src, hot, cold)
}

#[test]
fn corrupt_chunks_are_errors_not_panics() {
    let (dtype, layout, src, hot, cold) = sample_chunk();
    let mut out = vec![0u8; src.len()];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("shorter than table", cold[..10].to_vec()),
        ("truncated by one", cold[..cold.len() - 1].to_vec()),
        ("trailing byte", [cold.as_slice(), &[0]].concat()),
        ("zeroed table", {
            let mut c = cold.clone();
            c[..36 * 2].fill(0);
            c
        }),
        ("huge stream length", {
            let mut c = cold.clone();
            c[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
            c
        }),
    ];
    for (what, c) in cases {
        let e = residual::decode(dtype, &layout, &hot, &c, &mut out, K);
        assert!(e.is_err(), "{what}: accepted");
        let e = residual::decode_reference(dtype, &layout, &hot, &c, &mut out, K);
        assert!(e.is_err(), "{what}: reference accepted");
    }
}

#[test]
fn a_frame_declaring_more_than_its_class_is_rejected() {
    // Decompression bomb: a frame that declares more content than the class holds.
    let frame = residual_bomb();
    let mut out = vec![0u8; 16];
    let e = residual::zstd_decompress_exact(&frame, &mut out).unwrap_err();
    assert!(e.to_string().contains("declares"), "{e}");
}

fn residual_bomb() -> Vec<u8> {
    residual::zstd_compress(&vec![0u8; 1 << 20], 3).unwrap()
}

#[test]
fn random_bit_flips_never_panic() {
    let (dtype, layout, src, hot, cold) = sample_chunk();
    let mut rng = SplitMix(77);
    let mut out = vec![0u8; src.len()];
    for _ in 0..2000 {
        let mut c = cold.clone();
        let bit = (rng.next() % (c.len() as u64 * 8)) as usize;
        c[bit / 8] ^= 1 << (bit % 8);
        // Either an error or some output; never a panic. (The xxh3 of the
        // chunk is what catches silent changes; that is the pipeline's job.)
        let _ = residual::decode(dtype, &layout, &hot, &c, &mut out, K);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_bit_patterns_round_trip(
        words in proptest::collection::vec(any::<u64>(), 1..300),
        dt in 0usize..4, codec in 0usize..2, group in 1usize..80, cols in 1usize..40,
    ) {
        let dtype = DTYPES[dt];
        let n = (words.len() / cols).max(1) * cols;
        let mut src = vec![0u8; n * dtype.width()];
        for i in 0..n {
            dtype.store_bits(&mut src, i, words[i % words.len()] & dtype.mask());
        }
        roundtrip(dtype, &BaseLayout { codec: CODECS[codec], group, cols }, &src);
    }
}

#[test]
fn a_base_with_a_nonzero_padding_nibble_is_rejected() {
    let dtype = FloatDtype::BF16;
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 3,
    };
    let src = weights(dtype, 3 * 4, 1);
    let mut hot = vec![0u8; 4 * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
    hot[layout.row_bytes() - 1] |= 0x30;
    let mut out = vec![0u8; src.len()];
    assert!(residual::decode(dtype, &layout, &hot, &cold, &mut out, K).is_err());
    assert!(residual::decode_reference(dtype, &layout, &hot, &cold, &mut out, K).is_err());
}

#[test]
fn a_q8_base_with_code_minus_128_is_rejected_not_a_panic() {
    let dtype = FloatDtype::F32;
    let layout = BaseLayout {
        codec: BaseCodec::Q8,
        group: 32,
        cols: 64,
    };
    let src = weights(dtype, 64 * 2, 3);
    let mut hot = vec![0u8; 2 * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
    hot[5] = 0x80;
    let mut out = vec![0u8; src.len()];
    let e = residual::decode(dtype, &layout, &hot, &cold, &mut out, K).unwrap_err();
    assert!(e.to_string().contains("-128"), "{e}");
    assert!(residual::decode_reference(dtype, &layout, &hot, &cold, &mut out, K).is_err());
}

#[test]
fn a_base_with_a_non_finite_scale_is_rejected() {
    // 0 × Inf is a NaN whose sign depends on the processor: a scale that is
    // not finite would make the rebuild depend on the machine.
    // Groups of 32, and of 64 (the whole-block path, whose values may be
    // stored past the cache).
    for (codec, group) in [
        (BaseCodec::Q4, 32),
        (BaseCodec::Q8, 32),
        (BaseCodec::Q4, 64),
    ] {
        let dtype = FloatDtype::BF16;
        let layout = BaseLayout {
            codec,
            group,
            cols: 64,
        };
        let src = weights(dtype, 64, 4);
        let mut hot = vec![0u8; layout.row_bytes()];
        base::quantize(dtype, &layout, &src, &mut hot);
        let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
        for scale in [0x7C00u16, 0xFC00, 0x7E01] {
            let mut h = hot.clone();
            h[0..2].copy_from_slice(&scale.to_le_bytes());
            let mut out = vec![0u8; src.len()];
            let e = residual::decode(dtype, &layout, &h, &cold, &mut out, K).unwrap_err();
            assert!(e.to_string().contains("scale"), "{e}");
            assert!(residual::decode_reference(dtype, &layout, &h, &cold, &mut out, K).is_err());
            let mut room = vec![0u8; src.len() + 64];
            let at = room.as_ptr().align_offset(64);
            let out = &mut room[at..at + src.len()];
            let stores = residual::Stores::PastCache;
            let e = residual::decode_timed(dtype, &layout, &h, &cold, out, K, stores).unwrap_err();
            assert!(e.to_string().contains("scale"), "{e}");
        }
    }
}

#[test]
fn a_zstd_frame_asking_for_a_huge_window_is_rejected() {
    // Hand-made frame: no single-segment flag, window descriptor 2^31,
    // 4-byte content size 5, one raw block of 5 bytes.
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0x80, (31 - 10) << 3];
    f.extend_from_slice(&5u32.to_le_bytes());
    f.extend_from_slice(&[(5 << 3 | 1) as u8, 0, 0]);
    f.extend_from_slice(b"hello");
    let mut out = [0u8; 5];
    assert!(residual::zstd_decompress_exact(&f, &mut out).is_err());
    // The same frame with a small window decodes, so the window is the reason.
    f[5] = 0;
    residual::zstd_decompress_exact(&f, &mut out).unwrap();
    assert_eq!(&out, b"hello");
}

/// A base whose codes were changed after the residual was made: the fast
/// decoder takes each class's element count from the residual's frames and
/// checks it against the base while it rebuilds (the reference counts the
/// base first). Both must agree: the same error-or-not, and when a change
/// keeps every class's count (a code swapped for another of its class), the
/// same output.
#[test]
fn a_base_changed_after_the_residual_gives_the_references_answer() {
    let mut rng = SplitMix(2026);
    let (mut errors, mut same_counts) = (0, 0);
    for case in 0..400 {
        let dtype = DTYPES[case % 4];
        let codec = CODECS[(case / 4) % 2];
        // 64-element groups over 128 columns take the AVX-512 path where it
        // exists; 100 columns end rows with a tail group (the scalar path).
        let cols = if case % 3 == 0 { 100 } else { 128 };
        let layout = BaseLayout {
            codec,
            group: 64,
            cols,
        };
        let rows = 6;
        let src = weights(dtype, cols * rows, case as u64);
        let mut hot = vec![0u8; rows * layout.row_bytes()];
        base::quantize(dtype, &layout, &src, &mut hot);
        let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
        // Change one to four code bytes (never a scale: those have their own test).
        for _ in 0..1 + rng.next() % 4 {
            let r = (rng.next() % rows as u64) as usize;
            let col = (rng.next() % cols as u64) as usize;
            let g = col / 64;
            let in_group = col % 64;
            let n = 64.min(cols - g * 64);
            let off = r * layout.row_bytes() + g * layout.block_bytes(64) + 2;
            match codec {
                BaseCodec::Q4 => {
                    if in_group < n {
                        let shift = 4 * (in_group % 2);
                        let b = &mut hot[off + in_group / 2];
                        // Half the time the mirror code (−q: the same class).
                        let old = (*b >> shift) & 15;
                        let new = if rng.next().is_multiple_of(2) && old > 0 {
                            16 - old
                        } else {
                            (rng.next() % 16) as u8
                        };
                        *b = (*b & !(15 << shift)) | (new << shift);
                    }
                }
                BaseCodec::Q8 => {
                    let old = hot[off + in_group] as i8 as i32;
                    let v = if rng.next().is_multiple_of(2) {
                        -old
                    } else {
                        (rng.next() % 255) as i32 - 127
                    };
                    hot[off + in_group] = v as i8 as u8;
                }
            }
        }
        let mut fast = vec![0u8; src.len()];
        let mut reference = vec![0u8; src.len()];
        let a = residual::decode(dtype, &layout, &hot, &cold, &mut fast, K);
        let b = residual::decode_reference(dtype, &layout, &hot, &cold, &mut reference, K);
        assert_eq!(
            a.is_ok(),
            b.is_ok(),
            "case {case}: fast {a:?}, reference {b:?}"
        );
        match a {
            Ok(()) => {
                same_counts += 1;
                assert!(fast == reference, "case {case}: outputs differ");
            }
            Err(_) => errors += 1,
        }
    }
    // Both outcomes were exercised.
    assert!(
        errors > 50 && same_counts > 50,
        "{errors} errors, {same_counts} same counts"
    );
}

/// Groups of 64 built to hit the rules of the scale: ties for the largest
/// magnitude between opposite signs (the first wins), −0 before +0 in a
/// group of zeros, groups of only NaN or ±Inf, a largest finite value next
/// to infinities, values that round exactly half-way between two codes, and
/// magnitudes at the f16 limits. The fast quantizer (64-element groups go
/// through SIMD where the machine has it) must match the reference.
#[test]
fn quantize_matches_the_reference_on_built_groups() {
    for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
        let enc = |v: f32| -> u64 {
            match dtype {
                FloatDtype::BF16 => half::bf16::from_f32(v).to_bits() as u64,
                FloatDtype::F16 => half::f16::from_f32(v).to_bits() as u64,
                _ => v.to_bits() as u64,
            }
        };
        let nan = dtype.mask() & !dtype.sign_mask(); // all exponent and mantissa bits: a NaN
        let groups: Vec<Vec<u64>> = vec![
            // tie between −3 and +3: −3 comes first
            (0..64)
                .map(|i| {
                    enc(match i {
                        5 => -3.0,
                        9 => 3.0,
                        _ => 0.5,
                    })
                })
                .collect(),
            // +3 first
            (0..64)
                .map(|i| {
                    enc(match i {
                        5 => 3.0,
                        9 => -3.0,
                        _ => -0.25,
                    })
                })
                .collect(),
            // −0 then +0 only
            (0..64)
                .map(|i| if i % 2 == 0 { dtype.sign_mask() } else { 0 })
                .collect(),
            // only NaN and ±Inf
            (0..64)
                .map(|i| {
                    if i % 3 == 0 {
                        nan
                    } else {
                        enc(if i % 2 == 0 {
                            f32::INFINITY
                        } else {
                            f32::NEG_INFINITY
                        })
                    }
                })
                .collect(),
            // infinities around a largest finite value
            (0..64)
                .map(|i| {
                    enc(match i {
                        0 => f32::INFINITY,
                        1 => 2.0,
                        63 => f32::NEG_INFINITY,
                        _ => 1.0 / (i as f32),
                    })
                })
                .collect(),
            // half-way values: max 8 gives d = −1, so k + 0.5 lies between codes
            (0..64)
                .map(|i| enc(if i == 0 { 8.0 } else { (i % 16) as f32 - 7.5 }))
                .collect(),
            // beyond the f16 range (scale clamped), and tiny subnormal-scale groups
            (0..64)
                .map(|i| enc(if i == 7 { 1.0e6 } else { 3.0e5 }))
                .collect(),
            (0..64)
                .map(|i| enc(if i == 7 { 1.0e-6 } else { -3.0e-7 }))
                .collect(),
        ];
        let layout = BaseLayout {
            codec: BaseCodec::Q4,
            group: 64,
            cols: 64,
        };
        for (g, bits) in groups.iter().enumerate() {
            let mut src = vec![0u8; 64 * dtype.width()];
            for (i, &b) in bits.iter().enumerate() {
                dtype.store_bits(&mut src, i, b & dtype.mask());
            }
            let mut fast = vec![0u8; layout.row_bytes()];
            let mut reference = vec![0u8; layout.row_bytes()];
            base::quantize(dtype, &layout, &src, &mut fast);
            base::quantize_reference(dtype, &layout, &src, &mut reference);
            assert_eq!(fast, reference, "{dtype:?} group {g}");
            roundtrip(dtype, &layout, &src);
        }
    }
}

/// Residual streams at levels 1 to `TUNED_UP_TO_LEVEL` are made with the
/// writer's match settings (matches of 7 bytes or more): on a plane whose
/// only repeats are 5 bytes long the frame differs from plain level 3's;
/// above the tuned levels the two are the same frame. Every frame decodes
/// to its input.
#[test]
fn residual_streams_use_the_writers_match_settings_at_the_tuned_levels() {
    let mut rng = SplitMix(11);
    // Random bytes with a 5-byte motif every 16 bytes: level 3's matches
    // (minimum 5 bytes at its settings) find the motif, 7-byte matches do not.
    let mut plane = Vec::new();
    while plane.len() < 1 << 16 {
        plane.extend_from_slice(&[0xA5, 0x5A, 0x3C, 0xC3, 0x99]);
        plane.extend((0..11).map(|_| rng.next() as u8));
    }
    let plain = residual::zstd_compress(&plane, 3).unwrap();
    let tuned = residual::zstd_compress_residual(&plane, 3).unwrap();
    assert_ne!(plain, tuned, "level 3: the residual settings apply");
    let above = residual::TUNED_UP_TO_LEVEL + 2;
    assert_eq!(
        residual::zstd_compress(&plane, above).unwrap(),
        residual::zstd_compress_residual(&plane, above).unwrap(),
        "level {above}: the level's own settings"
    );
    for f in [plain, tuned] {
        let mut out = vec![0u8; plane.len()];
        residual::zstd_decompress_exact(&f, &mut out).unwrap();
        assert!(out == plane);
    }
}

/// The table entries of a chunk's split streams: (stream index, the
/// stream's element count, where the stream starts in the chunk).
fn split_entries(cold: &[u8], streams: usize) -> Vec<(usize, usize, usize)> {
    let mut at = streams * 4;
    let mut out = Vec::new();
    for i in 0..streams {
        let e = u32::from_le_bytes(cold[i * 4..i * 4 + 4].try_into().unwrap());
        let len = (e & 0x7FFF_FFFF) as usize;
        if e & 0x8000_0000 != 0 {
            let n = u32::from_le_bytes(cold[at..at + 4].try_into().unwrap()) as usize;
            out.push((i, n, at));
        }
        at += len;
    }
    out
}

/// A chunk of trained-like weights large enough for the writer to split
/// the planes whose low nibbles are noise: it does, and both decoders
/// rebuild it; every dtype, with every stream split too (odd lengths
/// included), and the two kinds give the same bytes back.
#[test]
fn split_streams_round_trip_in_both_decoders() {
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 256,
    };
    let mut odd = 0;
    for dtype in DTYPES {
        for (rows, seed) in [(384, 1), (257, 2), (129, 3)] {
            let src = weights(dtype, rows * 256, seed);
            let mut hot = vec![0u8; rows * layout.row_bytes()];
            base::quantize(dtype, &layout, &src, &mut hot);
            let streams = residual::class_count(layout.codec) * dtype.width();
            let chosen =
                residual::encode(dtype, &layout, &src, &hot, 3, residual::Kind::V2).unwrap();
            let every = residual::encode_every_stream_split(dtype, &layout, &src, &hot, 3).unwrap();
            let v1 = residual::encode(dtype, &layout, &src, &hot, 3, residual::Kind::V1).unwrap();
            assert!(split_entries(&v1, streams).is_empty());
            let all = split_entries(&every, streams);
            assert!(!all.is_empty());
            odd += all.iter().filter(|e| e.1 % 2 == 1).count();
            if rows == 384 && matches!(dtype, FloatDtype::BF16 | FloatDtype::F32) {
                // Enough elements per class for the writer's choice to
                // split (the plane with a BF16 value's low mantissa bits;
                // F16 keeps 3 more, and its planes split less).
                assert!(
                    !split_entries(&chosen, streams).is_empty(),
                    "{dtype:?}: the writer split nothing"
                );
            }
            for (what, cold) in [("chosen", &chosen), ("every", &every)] {
                let mut fast = vec![0u8; src.len()];
                let mut reference = vec![0xAAu8; src.len()];
                residual::decode(dtype, &layout, &hot, cold, &mut fast, residual::Kind::V2)
                    .unwrap();
                residual::decode_reference(
                    dtype,
                    &layout,
                    &hot,
                    cold,
                    &mut reference,
                    residual::Kind::V2,
                )
                .unwrap();
                assert!(fast == src, "{dtype:?} {rows} rows {what}: fast decoder");
                assert!(
                    reference == src,
                    "{dtype:?} {rows} rows {what}: reference decoder"
                );
            }
        }
    }
    assert!(odd > 0, "no split stream of odd length was tested");
}

/// Damaged split streams are errors in both decoders, never panics or
/// other bytes: a wrong element count, a nonzero padding nibble, the split
/// bit set on a plain frame or cleared on a split stream, a split stream of
/// 0 bytes, and any split stream in an `exact-v1` chunk.
#[test]
fn damaged_split_streams_are_refused_by_both_decoders() {
    let dtype = FloatDtype::BF16;
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 256,
    };
    let rows = 257;
    let src = weights(dtype, rows * 256, 9);
    let mut hot = vec![0u8; rows * layout.row_bytes()];
    base::quantize(dtype, &layout, &src, &mut hot);
    let streams = residual::class_count(layout.codec) * dtype.width();
    let cold = residual::encode_every_stream_split(dtype, &layout, &src, &hot, 3).unwrap();
    let splits = split_entries(&cold, streams);
    let &(i_odd, n_odd, at_odd) = splits.iter().find(|e| e.1 % 2 == 1).expect("an odd stream");
    let entry = |c: &[u8], i: usize| u32::from_le_bytes(c[i * 4..i * 4 + 4].try_into().unwrap());
    let set_entry =
        |c: &mut Vec<u8>, i: usize, v: u32| c[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    let mut cases: Vec<(String, Vec<u8>, residual::Kind)> = Vec::new();
    for (i, n, at) in splits.iter().copied().take(4) {
        for m in [n - 1, n + 1, 0] {
            let mut c = cold.clone();
            c[at..at + 4].copy_from_slice(&(m as u32).to_le_bytes());
            cases.push((
                format!("stream {i}: count {n} -> {m}"),
                c,
                residual::Kind::V2,
            ));
        }
        let mut c = cold.clone();
        let e = entry(&c, i);
        set_entry(&mut c, i, e & 0x7FFF_FFFF);
        cases.push((
            format!("stream {i}: split bit cleared"),
            c,
            residual::Kind::V2,
        ));
    }
    // The unused half of the last low-nibble byte of an odd stream.
    let len = (entry(&cold, i_odd) & 0x7FFF_FFFF) as usize;
    let mut c = cold.clone();
    c[at_odd + len - 1] |= 0x10;
    cases.push((
        format!("stream {i_odd} (n = {n_odd}): padding nibble"),
        c,
        residual::Kind::V2,
    ));
    // The same chunk as exact-v1.
    cases.push((
        "split streams under exact-v1".into(),
        cold.clone(),
        residual::Kind::V1,
    ));
    // A plain chunk with the split bit set on a stream, and a split
    // stream of length 0.
    let plain = residual::encode(dtype, &layout, &src, &hot, 3, residual::Kind::V1).unwrap();
    for i in 0..streams {
        let e = entry(&plain, i);
        if e != 0 {
            let mut c = plain.clone();
            set_entry(&mut c, i, e | 0x8000_0000);
            cases.push((
                format!("stream {i}: split bit on a plain frame"),
                c,
                residual::Kind::V2,
            ));
        } else {
            let mut c = plain.clone();
            set_entry(&mut c, i, 0x8000_0000);
            cases.push((
                format!("stream {i}: a split stream of 0 bytes"),
                c,
                residual::Kind::V2,
            ));
        }
    }
    let mut out = vec![0u8; src.len()];
    for (what, c, kind) in &cases {
        let a = residual::decode(dtype, &layout, &hot, c, &mut out, *kind);
        let b = residual::decode_reference(dtype, &layout, &hot, c, &mut out, *kind);
        assert!(
            a.is_err() && b.is_err(),
            "{what}: fast {a:?}, reference {b:?}"
        );
    }
    // The undamaged chunk decodes.
    residual::decode(dtype, &layout, &hot, &cold, &mut out, residual::Kind::V2).unwrap();
    assert!(out == src);
}

#[test]
fn the_gather_skips_top_planes_only_where_they_are_zero() {
    // BF16 and F32 weight-like values against their own base leave the
    // top byte plane of every class but 0 zero (F16's longer mantissa does
    // not); values on their base's grid leave every plane zero; values
    // against the base of other values (the residual then carries the
    // whole difference) leave none. The fast decode must be bit-exact every
    // way, and both answers must occur for each type.
    let layout = BaseLayout {
        codec: BaseCodec::Q4,
        group: 64,
        cols: 256,
    };
    let rows = 64;
    let n = rows * layout.cols;
    let values = |dtype: FloatDtype, rng: &mut SplitMix, scale: f64| {
        let mut out = vec![0u8; n * dtype.width()];
        for i in 0..n {
            let v = rng.normal_ish() * scale;
            let bits = match dtype {
                FloatDtype::F16 => half::f16::from_f64(v).to_bits() as u64,
                FloatDtype::BF16 => half::bf16::from_f64(v).to_bits() as u64,
                _ => (v as f32).to_bits() as u64,
            };
            dtype.store_bits(&mut out, i, bits);
        }
        out
    };
    for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
        let mut seen = [false; 2];
        for seed in 0..6u64 {
            let mut rng = SplitMix(seed);
            let mut src = values(dtype, &mut rng, 1.0);
            let of = if seed % 3 == 1 {
                values(dtype, &mut rng, 4.0)
            } else {
                src.clone()
            };
            let mut hot = vec![0u8; rows * layout.row_bytes()];
            base::quantize(dtype, &layout, &of, &mut hot);
            if seed % 3 == 2 {
                residual::base_values_reference(dtype, &layout, &hot, &mut src).unwrap();
            }
            let cold = residual::encode(dtype, &layout, &src, &hot, 3, K).unwrap();
            let zero = residual::top_planes_zero(dtype, &layout, rows, &cold, K).unwrap();
            seen[usize::from(zero)] = true;
            let want = match seed % 3 {
                0 => dtype != FloatDtype::F16,
                1 => false,
                _ => true,
            };
            assert_eq!(zero, want, "{dtype:?} seed {seed}: top planes zero");
            let mut out = vec![0u8; src.len()];
            residual::decode(dtype, &layout, &hot, &cold, &mut out, K).unwrap();
            assert!(
                out == src,
                "{dtype:?} seed {seed}: not bit-exact (top planes zero: {zero})"
            );
            // The same chunk with zstd's own frames for its planes of zeros
            // (as containers written before the writer's frames of zeros
            // hold them): found zero by looking at the planes.
            let (relaid, zeros) = zeros_as_zstd_frames(&cold, 9 * dtype.width());
            assert!(zeros > 0 || !zero, "{dtype:?} seed {seed}: planes of zeros");
            assert!(relaid != cold || zeros == 0);
            let z = residual::top_planes_zero(dtype, &layout, rows, &relaid, K).unwrap();
            assert_eq!(z, zero, "{dtype:?} seed {seed}: the same answer");
            let mut out = vec![0u8; src.len()];
            residual::decode(dtype, &layout, &hot, &relaid, &mut out, K).unwrap();
            assert!(
                out == src,
                "{dtype:?} seed {seed}: zstd's frames, not bit-exact"
            );
            let mut out_ref = vec![0u8; src.len()];
            residual::decode_reference(dtype, &layout, &hot, &cold, &mut out_ref, K).unwrap();
            assert!(
                out_ref == src,
                "{dtype:?} seed {seed}: reference not bit-exact"
            );
        }
        assert_eq!(seen, [true, true], "{dtype:?}: [not zero, zero] both seen");
    }
}

/// `chunk` (of `streams` streams) with every plain stream that decodes to
/// zeros only replaced by zstd's own frame of those zeros (a compressed
/// block), and how many there were.
fn zeros_as_zstd_frames(chunk: &[u8], streams: usize) -> (Vec<u8>, usize) {
    let mut table = Vec::new();
    let mut body = Vec::new();
    let mut at = streams * 4;
    let mut replaced = 0;
    for i in 0..streams {
        let e = u32::from_le_bytes(chunk[i * 4..i * 4 + 4].try_into().unwrap());
        let (len, split) = ((e & !(1 << 31)) as usize, e >> 31 == 1);
        let s = &chunk[at..at + len];
        at += len;
        let n = if split || len == 0 {
            None
        } else {
            zstd::zstd_safe::get_frame_content_size(s).unwrap()
        };
        let zeros = n
            .map(|n| zstd::bulk::decompress(s, n as usize).unwrap())
            .filter(|d| d.iter().all(|&b| b == 0));
        let stream = match zeros {
            Some(z) => {
                replaced += 1;
                let mut c = zstd::bulk::Compressor::new(3).unwrap();
                c.include_contentsize(true).unwrap();
                c.compress(&z).unwrap()
            }
            None => s.to_vec(),
        };
        let entry = stream.len() as u32 | if split { 1 << 31 } else { 0 };
        table.extend_from_slice(&entry.to_le_bytes());
        body.extend_from_slice(&stream);
    }
    table.extend_from_slice(&body);
    (table, replaced)
}
