//! The GGUF header reader must turn any bytes into a header or an error:
//! no panic, no abort, no allocation beyond what the input justifies.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, raw)) = tpde_ingest::gguf::read_header(data, data.len() as u64) {
        // What the reader promises about an accepted file.
        assert_eq!(raw.len() as u64, header.data_start);
        assert_eq!(&raw[..], &data[..raw.len()]);
        assert!(header.header_len <= header.data_start);
        assert!(header.data_start <= header.file_len);
        let data_len = header.file_len - header.data_start;
        let mut end = 0;
        for t in &header.tensors {
            assert_eq!(t.offset % header.alignment, 0);
            assert!(t.offset >= end);
            end = t.offset + t.byte_len;
            assert!(end <= data_len);
        }
        assert!(data_len - end < header.alignment);
    }
});
