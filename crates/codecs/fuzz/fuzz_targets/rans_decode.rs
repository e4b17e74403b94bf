//! The rANS decoders on arbitrary streams, and on valid streams damaged
//! where the input says: never a panic or a read out of bounds; the fast,
//! portable and reference decoders agree on every stream (the same error
//! or the same bytes); and arbitrary data round trips through the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpde_codecs::rans;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The first two bytes: how many symbols the caller expects (the
    // decoder is always told; a stream claiming another count is refused).
    let want = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let stream = &data[2..];
    let mut a = vec![0u8; want];
    let mut b = vec![0u8; want];
    let mut c = vec![0u8; want];
    let ra = rans::decode(stream, &mut a);
    let rb = rans::decode_reference(stream, &mut b);
    let rc = rans::decode_portable(stream, &mut c);
    assert_eq!(ra.is_ok(), rb.is_ok());
    assert_eq!(rc.is_ok(), rb.is_ok());
    if rb.is_ok() {
        assert_eq!(a, b);
        assert_eq!(c, b);
    }
    // Any bytes round trip.
    let z = rans::encode(stream);
    let mut back = vec![0u8; stream.len()];
    rans::decode(&z, &mut back).expect("a stream the encoder made decodes");
    assert_eq!(back, stream);
    // And a valid stream damaged at places the input chooses (random
    // streams rarely get past the table): the decoders still agree.
    if z.len() > 4 {
        let mut bad = z.clone();
        for (i, &b) in stream.iter().take(3).enumerate() {
            let pos = 4 + (usize::from(b) * 131 + i * 977) % (bad.len() - 4);
            bad[pos] ^= data[0] | 1;
        }
        let n = stream.len();
        let (mut a, mut b, mut c) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
        let ra = rans::decode(&bad, &mut a);
        let rb = rans::decode_reference(&bad, &mut b);
        let rc = rans::decode_portable(&bad, &mut c);
        assert_eq!(ra.is_ok(), rb.is_ok());
        assert_eq!(rc.is_ok(), rb.is_ok());
        if rb.is_ok() {
            assert_eq!(a, b);
            assert_eq!(c, b);
        }
    }
});
