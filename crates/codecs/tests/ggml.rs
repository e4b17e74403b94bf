//! ggml dequantizers: against the committed vectors that the gguf Python
//! package produced (`testdata/ggml/`, see its README), fast path against
//! reference on random blocks, and one test per rejection reason.

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use tpde_codecs::ggml::{dequantize, dequantize_reference, supports};
use tpde_format::ggml::GgmlType;

/// Every type the dequantizers support, in the order of `vectors.json`.
const SUPPORTED: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Largest allowed distance, in units in the last place, between our
/// output and the Python reference's: zero for every type, i.e. equal bit
/// patterns (signed zeros, infinities and NaN payloads included).
///
/// Why exact (module docs of `ggml`, *Exactness*): every result is its
/// formula's exact value rounded to f32 at most once, since an f16 scale
/// times a sub-scale times a code always fits f32's significand. gguf-py's
/// numpy code (and `dequantize_q8` in gen_vectors.py for Q8_1 and Q8_K,
/// which gguf-py lacks) computes in f32 with one IEEE rounding per ufunc, so
/// however it grouped the products it must land on the same f32 (it also
/// happens to use our order). Its f16 → f32 cast keeps NaN payloads as ours
/// does, and the vectors have no NaN or infinite scales, so no result
/// depends on which NaN an operation returns. A nonzero entry here would
/// mean a reference that rounds more than once.
fn max_ulp_from_python(ty: GgmlType) -> u64 {
    use GgmlType::*;
    match ty {
        // No arithmetic: bit moves and an exact widening.
        F32 | F16 | BF16 => 0,
        // Products of an f16 scale and integers: exact, nothing rounds.
        Q4_0 | Q5_0 | Q8_0 | Q8_1 | Q3_K | Q6_K => 0,
        // Exact products, then one rounding in the final add or subtract.
        Q4_1 | Q5_1 | Q2_K | Q4_K | Q5_K => 0,
        // One rounding: the f32 scale times the code.
        Q8_K => 0,
        _ => panic!("{ty:?} has no vectors"),
    }
}

/// Distance in ulps between two f32 (0 only for equal bit patterns; +0 and
/// −0 are 1 apart; a NaN is infinitely far from anything but its own bits).
fn ulp_distance(a: f32, b: f32) -> u64 {
    if a.to_bits() == b.to_bits() {
        return 0;
    }
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    // Monotonic map of the bit patterns onto integers, −0 just below +0.
    let ordered = |x: f32| {
        let bits = x.to_bits();
        if bits >> 31 == 1 {
            -i64::from(bits & 0x7FFF_FFFF) - 1
        } else {
            i64::from(bits)
        }
    };
    ordered(a).abs_diff(ordered(b))
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/ggml")
}

fn read(name: &str) -> Vec<u8> {
    let path = testdata().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&read("vectors.json")).expect("vectors.json is JSON")
}

#[test]
fn vectors_cover_every_supported_type_and_name_their_versions() {
    let m = manifest();
    // The versions the generator pins (gen_vectors.py checks them itself).
    assert_eq!(m["gguf"], "0.19.0");
    assert_eq!(m["numpy"], "2.4.6");
    let listed: Vec<&str> = m["types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| t["type"].as_str().expect("type name"))
        .collect();
    let supported: Vec<&str> = SUPPORTED.iter().map(|t| t.name()).collect();
    assert_eq!(listed, supported);
    for t in GgmlType::all() {
        assert_eq!(supports(t), SUPPORTED.contains(&t), "{t:?}");
    }
}

#[test]
fn committed_vectors_match_the_python_reference() {
    let m = manifest();
    for entry in m["types"].as_array().expect("types") {
        let name = entry["type"].as_str().expect("type name");
        let ty = GgmlType::from_name(name).expect("a ggml type");
        let bin = read(entry["bin"].as_str().expect("bin"));
        let f32s = read(entry["f32"].as_str().expect("f32"));
        // Drift: the files are exactly what the generator wrote.
        assert_eq!(sha256_hex(&bin), entry["bin_sha256"], "{name}.bin changed");
        assert_eq!(sha256_hex(&f32s), entry["f32_sha256"], "{name}.f32 changed");

        let elems = entry["elements"].as_u64().expect("elements") as usize;
        let blocks = entry["blocks"].as_u64().expect("blocks");
        assert_eq!(bin.len() as u64, blocks * ty.block_bytes(), "{name}");
        assert_eq!(f32s.len(), elems * 4, "{name}");
        let expected: Vec<f32> = f32s
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let mut fast = vec![0f32; elems];
        let mut reference = vec![0f32; elems];
        dequantize(ty, &bin, &mut fast).unwrap();
        dequantize_reference(ty, &bin, &mut reference).unwrap();
        for (what, got) in [("dequantize", &fast), ("dequantize_reference", &reference)] {
            let mut worst = (0u64, 0usize);
            for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                let d = ulp_distance(g, e);
                if d > worst.0 {
                    worst = (d, i);
                }
            }
            let (d, i) = worst;
            assert!(
                d <= max_ulp_from_python(ty),
                "{name} {what}: element {i} (block {}) is {:e} ({:#010x}), python says {:e} ({:#010x}): {d} ulp",
                i as u64 / ty.block_elems(),
                got[i],
                got[i].to_bits(),
                expected[i],
                expected[i].to_bits()
            );
        }
    }
}

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Fast path and reference on the same bytes: equal bit patterns for every
/// result that is not NaN; where one is NaN both are (random scales include
/// NaN and ±Inf f16/f32 patterns, and Rust leaves the payload of an
/// arithmetic NaN unspecified). Returns how many results were NaN.
fn assert_fast_matches_reference(ty: GgmlType, data: &[u8]) -> usize {
    let elems = data.len() / ty.block_bytes() as usize * ty.block_elems() as usize;
    let mut fast = vec![0f32; elems];
    let mut reference = vec![1f32; elems];
    dequantize(ty, data, &mut fast).unwrap();
    dequantize_reference(ty, data, &mut reference).unwrap();
    let mut nans = 0;
    for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
        if r.is_nan() {
            assert!(f.is_nan(), "{ty:?} element {i}: fast {f:e}, reference NaN");
            nans += 1;
        } else {
            assert_eq!(
                f.to_bits(),
                r.to_bits(),
                "{ty:?} element {i}: fast {f:e}, reference {r:e}"
            );
        }
    }
    nans
}

#[test]
fn fast_matches_reference_on_random_blocks() {
    let mut rng = SplitMix(0x6767_6d6c);
    for ty in SUPPORTED {
        let bb = ty.block_bytes() as usize;
        let (mut total, mut nans) = (0, 0);
        // Edge counts of blocks, then larger runs.
        for blocks in [0, 1, 2, 3, 7, 64] {
            for _ in 0..8 {
                let data = rng.bytes(blocks * bb);
                nans += assert_fast_matches_reference(ty, &data);
                total += blocks * ty.block_elems() as usize;
            }
        }
        // Random bytes make NaN scales rare (1 in 32 for f16): nearly all
        // results are compared bit for bit.
        assert!(nans * 4 < total, "{ty:?}: {nans} of {total} NaN");
    }
}

#[test]
fn fast_matches_reference_on_uniform_blocks() {
    // Every byte equal: all codes at one extreme, scales 0 or patterns like
    // 0xFFFF (NaN), 0x7F7F, 0x8080.
    for ty in SUPPORTED {
        for fill in [0x00, 0x01, 0x3C, 0x7F, 0x80, 0xAA, 0xFF] {
            let data = vec![fill; 3 * ty.block_bytes() as usize];
            assert_fast_matches_reference(ty, &data);
        }
    }
}

proptest! {
    #[test]
    fn fast_matches_reference_on_arbitrary_bytes(
        which in 0..SUPPORTED.len(),
        bytes in prop::collection::vec(any::<u8>(), 0..4 * 292),
    ) {
        let ty = SUPPORTED[which];
        let whole = bytes.len() / ty.block_bytes() as usize * ty.block_bytes() as usize;
        assert_fast_matches_reference(ty, &bytes[..whole]);
    }
}

/// Both entry points reject `(ty, data, out)` with an error naming the type
/// and leave `out` untouched.
fn assert_rejected(ty: GgmlType, data: &[u8], out_len: usize, says: &str) {
    type Dequantizer = fn(GgmlType, &[u8], &mut [f32]) -> Result<(), tpde_codecs::CodecError>;
    let entry_points: [(&str, Dequantizer); 2] = [
        ("dequantize", dequantize),
        ("dequantize_reference", dequantize_reference),
    ];
    for (what, f) in entry_points {
        let mut out = vec![7f32; out_len];
        let err = f(ty, data, &mut out).expect_err(what).to_string();
        assert!(err.contains(ty.name()), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err:?} should say {says:?}");
        assert!(out.iter().all(|&v| v == 7.0), "{what} wrote to out");
    }
}

#[test]
fn rejects_data_that_is_not_whole_blocks() {
    for ty in SUPPORTED {
        let bb = ty.block_bytes() as usize;
        let be = ty.block_elems() as usize;
        if bb > 1 {
            assert_rejected(ty, &[0; 1], be, "not a whole number");
            assert_rejected(ty, &vec![0; bb - 1], be, "not a whole number");
            assert_rejected(ty, &vec![0; 2 * bb + 1], 2 * be, "not a whole number");
        }
    }
    assert_rejected(
        GgmlType::Q4_0,
        &[0; 17],
        32,
        "17 bytes is not a whole number of 18-byte blocks",
    );
}

#[test]
fn rejects_an_output_of_the_wrong_length() {
    for ty in SUPPORTED {
        let data = vec![0; 2 * ty.block_bytes() as usize];
        let be = ty.block_elems() as usize;
        assert_rejected(ty, &data, 2 * be - 1, "out has");
        assert_rejected(ty, &data, 2 * be + 1, "out has");
        assert_rejected(ty, &data, 0, "out has");
        assert_rejected(ty, &[], 1, "out has");
    }
    assert_rejected(
        GgmlType::Q8_K,
        &[0; 584],
        511,
        "2 blocks hold 512 elements, out has 511",
    );
}

#[test]
fn rejects_unsupported_types() {
    let unsupported: Vec<GgmlType> = GgmlType::all().filter(|&t| !supports(t)).collect();
    assert!(unsupported.contains(&GgmlType::IQ2_XXS));
    for ty in unsupported {
        // Even with sizes that fit the type.
        let data = vec![0; ty.block_bytes() as usize];
        assert_rejected(ty, &data, ty.block_elems() as usize, "no dequantizer");
    }
}

#[test]
fn empty_input_is_fine() {
    for ty in SUPPORTED {
        dequantize(ty, &[], &mut []).unwrap();
        dequantize_reference(ty, &[], &mut []).unwrap();
    }
}
