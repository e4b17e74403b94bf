//! The safetensors header reader must turn any bytes into a header or an
//! error: no panic, no abort, no allocation beyond what the input justifies.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, raw)) = tpde_ingest::safetensors::read_header(data, data.len() as u64) {
        assert_eq!(raw.len() as u64, header.data_start);
        assert_eq!(&raw[..], &data[..raw.len()]);
        let mut end = 0;
        for t in &header.tensors {
            assert_eq!(t.begin, end);
            end = t.end;
        }
        assert_eq!(end, header.data_len());
    }
});
