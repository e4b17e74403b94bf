//! Reading helpers shared by the readers.

use std::io::{self, Read};

/// Fills `buf` from `reader`, retrying on `Interrupted`; returns how many
/// bytes were read, fewer than `buf.len()` only at end of file. A reader
/// that claims more bytes than it was given room for is an error.
pub(crate) fn read_until_full_or_eof<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        let want = rest.len();
        match reader.read(rest) {
            Ok(0) => break,
            Ok(got) if got <= want => filled += got,
            Ok(got) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reader returned {got} bytes into a {want}-byte buffer"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
