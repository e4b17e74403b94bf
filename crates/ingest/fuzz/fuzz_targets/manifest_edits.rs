//! The container manifest's validation (`tpde_format::Manifest::parse`)
//! must turn any manifest into a validated one or an error: no panic, no
//! overflow. Structure-aware: the input is a list of edits to the numeric
//! fields of a real version 4 manifest (the `moe-q4` test vector, with
//! expert shards, stacked and per-expert tensors), so that the fuzzer
//! explores offsets, lengths, section indices and hot lengths near valid
//! ones instead of spending its time on JSON syntax.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;

const CONTAINER: &[u8] = include_bytes!("../../../../formats/vectors/v4/moe-q4/moe-q4.tpde");

/// The seed manifest, its offset and the container length.
fn seed() -> &'static (Value, u64, u64) {
    static SEED: OnceLock<(Value, u64, u64)> = OnceLock::new();
    SEED.get_or_init(|| {
        let off = u64::from_le_bytes(CONTAINER[16..24].try_into().unwrap());
        let len = u64::from_le_bytes(CONTAINER[24..32].try_into().unwrap());
        let m = serde_json::from_slice(&CONTAINER[off as usize..(off + len) as usize]).unwrap();
        (m, off, CONTAINER.len() as u64)
    })
}

/// Paths (as JSON pointers) of every number in `v`, in document order.
fn numbers(v: &Value, at: &mut String, out: &mut Vec<String>) {
    match v {
        Value::Number(_) => out.push(at.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let n = at.len();
                at.push_str(&format!("/{i}"));
                numbers(x, at, out);
                at.truncate(n);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let n = at.len();
                at.push('/');
                at.push_str(k);
                numbers(x, at, out);
                at.truncate(n);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let (m0, off, file_len) = seed();
    let mut m = m0.clone();
    let mut paths = Vec::new();
    numbers(&m, &mut String::new(), &mut paths);
    // Each 11-byte record: which number (2 bytes), how to change it (1),
    // by how much (8).
    for r in data.chunks_exact(11) {
        let at = &paths[u16::from_le_bytes([r[0], r[1]]) as usize % paths.len()];
        let x = u64::from_le_bytes(r[3..11].try_into().unwrap());
        let Some(slot) = m.pointer_mut(at) else {
            continue;
        };
        let old = slot.as_u64().unwrap_or(0);
        *slot = match r[2] % 4 {
            0 => Value::from(old.wrapping_add(x % 8192)),
            1 => Value::from(old.wrapping_sub(x % 8192)),
            2 => Value::from(x),
            _ => Value::from(x as i64),
        };
    }
    let bytes = serde_json::to_vec(&m).unwrap();
    if let Ok(parsed) = tpde_format::Manifest::parse(&bytes, *off, *file_len) {
        // What validation promises about an accepted manifest.
        let mut sum = 0u64;
        for s in &parsed.sections {
            assert!(s.offset + s.len <= *off);
            sum += s.len;
        }
        assert!(sum <= *off);
        for x in &parsed.experts {
            let s = &parsed.sections[x.section as usize];
            assert_eq!(s.kind, tpde_format::SectionKind::Expert);
            assert!(x.hot_len <= s.len);
        }
        let _ = parsed.bytes_by_kind();
        let _ = parsed.padding(*off);
    }
});
