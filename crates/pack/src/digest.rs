//! BLAKE3 of a byte stream whose pieces are hashed on different threads.
//!
//! pack, verify and unpack make a stream's bytes (a tensor, a file) as
//! chunks on worker threads and commit them in order on one thread. Hashing
//! there, in order, is serial: two BLAKE3 passes (tensor and file) on the
//! committing thread were a fifth of verify's time. Instead each worker
//! hashes the part of its piece that forms whole subtrees of the stream's
//! BLAKE3 tree ([`Piece::of`], given the piece's offset in the stream), and
//! the committing thread only joins them ([`Stream`]): it merges subtree
//! chaining values and hashes the few bytes of the 1 KiB BLAKE3 chunks that
//! straddle two pieces. The result is `blake3::hash` of the whole stream,
//! bit for bit (tested against it over many splits), through the `hazmat`
//! API of the `blake3` crate that exists for exactly this.

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use blake3::{Hash, Hasher, CHUNK_LEN};

const CHUNK: u64 = CHUNK_LEN as u64;

/// What a worker computed of one piece `[offset, offset + len)` of a stream:
/// the bytes before its first whole BLAKE3 chunk (`head`), the chaining
/// values of the aligned subtrees of whole chunks after them, and the bytes
/// left after those (`tail`). The stream's last BLAKE3 chunk is always left
/// in the tail: only the end of the tree may be finalized as its root.
#[derive(Debug, Default)]
pub struct Piece {
    offset: u64,
    head: Vec<u8>,
    subtrees: Vec<(ChainingValue, u64)>,
    tail: Vec<u8>,
}

impl Piece {
    /// Where the piece starts in its stream.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Where the piece ends in its stream.
    pub fn end(&self) -> u64 {
        let whole: u64 = self.subtrees.iter().map(|&(_, n)| n * CHUNK).sum();
        self.offset + self.head.len() as u64 + whole + self.tail.len() as u64
    }

    /// Hashes the whole subtrees of `bytes`, which sit at `offset` in a
    /// stream of `total` bytes.
    pub fn of(bytes: &[u8], offset: u64, total: u64) -> Piece {
        // A piece running past `total` (offsets planned from a damaged
        // manifest) is kept as bytes: its stream then gives a wrong digest,
        // never a panic or an overflow.
        let end = offset.saturating_add(bytes.len() as u64);
        // The start of the stream's last chunk: never hashed here.
        let last = if total == 0 {
            0
        } else {
            (total - 1) / CHUNK * CHUNK
        };
        let first = offset.div_ceil(CHUNK).saturating_mul(CHUNK);
        let body_end = (end / CHUNK * CHUNK).min(last);
        if end > total || first >= body_end {
            return Piece {
                offset,
                head: bytes.to_vec(),
                ..Piece::default()
            };
        }
        let mut subtrees = Vec::new();
        let mut at = first;
        while at < body_end {
            // The largest power-of-two run of chunks that starts here (its
            // start must be a multiple of its size) and fits before body_end.
            let index = at / CHUNK;
            let fits = (body_end - at) / CHUNK;
            let aligned = if index == 0 {
                u64::MAX
            } else {
                1 << index.trailing_zeros()
            };
            let n = 1u64 << (63 - aligned.min(fits).leading_zeros());
            let part = &bytes[(at - offset) as usize..(at - offset + n * CHUNK) as usize];
            let cv = Hasher::new()
                .set_input_offset(at)
                .update(part)
                .finalize_non_root();
            subtrees.push((cv, n));
            at += n * CHUNK;
        }
        Piece {
            offset,
            head: bytes[..(first - offset) as usize].to_vec(),
            subtrees,
            tail: bytes[(body_end - offset) as usize..].to_vec(),
        }
    }
}

/// Joins the [`Piece`]s of one stream, in order, into its BLAKE3.
#[derive(Debug, Default)]
pub struct Stream {
    /// Chaining values of merged subtrees, as in BLAKE3's own hasher.
    stack: Vec<ChainingValue>,
    /// Whole chunks already in `stack`.
    chunks: u64,
    /// Bytes of the chunk being filled (up to a whole one, kept until more
    /// input shows it is not the last). Grown when bytes come: a pack
    /// holds one stream per tensor at once (1 KiB each up front was 51 MB
    /// for 50,000 tensors).
    pending: Vec<u8>,
    /// Bytes taken so far.
    at: u64,
}

impl Stream {
    pub fn new() -> Stream {
        Stream::default()
    }

    /// Adds the next piece; `false` (and nothing added) when it does not
    /// start where the stream is (a piece of another length than its
    /// offsets were planned for).
    #[must_use]
    pub fn add(&mut self, p: &Piece) -> bool {
        if p.offset != self.at {
            return false;
        }
        self.bytes(&p.head);
        for &(cv, n) in &p.subtrees {
            self.flush();
            debug_assert!(
                self.pending.is_empty(),
                "subtrees start on a chunk boundary"
            );
            self.push(cv, n);
            self.at += n * CHUNK;
        }
        self.bytes(&p.tail);
        true
    }

    /// Adds bytes hashed on this thread (a piece too small to matter).
    pub fn bytes(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            self.flush();
            let take = (CHUNK_LEN - self.pending.len()).min(b.len());
            self.pending.extend_from_slice(&b[..take]);
            self.at += take as u64;
            b = &b[take..];
        }
    }

    /// The stream's BLAKE3.
    pub fn finalize(&self) -> Hash {
        if self.chunks == 0 {
            return blake3::hash(&self.pending);
        }
        let last = Hasher::new()
            .set_input_offset(self.chunks * CHUNK)
            .update(&self.pending)
            .finalize_non_root();
        // As BLAKE3's hasher ends each update: merge until the stack holds
        // one subtree per 1 bit of the chunk count; then fold from the right,
        // the last merge being the root.
        let mut stack = self.stack.clone();
        Self::merge_to(&mut stack, self.chunks.count_ones() as usize);
        let mut right = last;
        while stack.len() > 1 {
            let left = stack.pop().expect("more than one");
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        merge_subtrees_root(&stack[0], &right, Mode::Hash)
    }

    /// Hashes a whole pending chunk once more input follows it.
    fn flush(&mut self) {
        if self.pending.len() == CHUNK_LEN {
            let cv = Hasher::new()
                .set_input_offset(self.chunks * CHUNK)
                .update(&self.pending)
                .finalize_non_root();
            self.push(cv, 1);
            self.pending.clear();
        }
    }

    /// BLAKE3's own rule: before a new subtree goes on the stack, merge
    /// until the stack holds one entry per 1 bit of the chunk count.
    fn push(&mut self, cv: ChainingValue, chunks: u64) {
        Self::merge_to(&mut self.stack, self.chunks.count_ones() as usize);
        self.stack.push(cv);
        self.chunks += chunks;
    }

    fn merge_to(stack: &mut Vec<ChainingValue>, keep: usize) {
        while stack.len() > keep {
            let right = stack.pop().expect("two entries");
            let left = stack.pop().expect("two entries");
            stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

    fn joined(bytes: &[u8], cuts: &[usize]) -> Hash {
        let mut s = Stream::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            assert!(s.add(&Piece::of(&bytes[at..c], at as u64, bytes.len() as u64)));
            at = c;
        }
        s.finalize()
    }

    #[test]
    fn equals_blake3_over_many_lengths_and_splits() {
        let mut seed = 1u64;
        let lengths = [
            0usize,
            1,
            1023,
            1024,
            1025,
            2048,
            3071,
            3072,
            4096,
            5000,
            16384,
            16385,
            65536,
            100_000,
            262_144,
            300_001,
            1 << 20,
        ];
        for &n in &lengths {
            let bytes = data(n, n as u64);
            let want = blake3::hash(&bytes);
            // One piece, and pieces cut at random places (tiny and huge).
            assert_eq!(joined(&bytes, &[]), want, "{n} bytes, one piece");
            for _ in 0..20 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(99);
                let k = (seed >> 60) as usize;
                let mut cuts: Vec<usize> = (0..k)
                    .map(|i| {
                        let r = (seed.rotate_left(7 * i as u32 + 3) >> 11) as usize;
                        if n == 0 {
                            0
                        } else {
                            r % (n + 1)
                        }
                    })
                    .collect();
                cuts.sort_unstable();
                assert_eq!(joined(&bytes, &cuts), want, "{n} bytes, cuts {cuts:?}");
            }
            // Cuts on chunk boundaries, and every piece smaller than a chunk.
            let aligned: Vec<usize> = (1..n / 1024).map(|i| i * 1024).collect();
            assert_eq!(joined(&bytes, &aligned), want, "{n} bytes, aligned cuts");
            if n <= 5000 {
                let small: Vec<usize> = (1..n).step_by(333).collect();
                assert_eq!(joined(&bytes, &small), want, "{n} bytes, small pieces");
            }
        }
    }

    #[test]
    fn pieces_past_the_end_or_at_huge_offsets_do_not_panic() {
        let bytes = data(5000, 3);
        for (offset, total) in [
            (0, 100),
            (u64::MAX - 10, u64::MAX),
            (4000, 4000),
            (1 << 40, 5000),
        ] {
            let p = Piece::of(&bytes, offset, total);
            let mut s = Stream::new();
            let _ = s.add(&p);
            let _ = s.finalize();
        }
    }

    #[test]
    fn bytes_and_pieces_mix() {
        let bytes = data(70_000, 5);
        let mut s = Stream::new();
        s.bytes(&bytes[..100]);
        assert!(s.add(&Piece::of(&bytes[100..50_000], 100, 70_000)));
        s.bytes(&bytes[50_000..50_500]);
        // A piece that does not start where the stream is, is refused.
        assert!(!s.add(&Piece::of(&bytes[50_600..], 50_600, 70_000)));
        assert!(s.add(&Piece::of(&bytes[50_500..], 50_500, 70_000)));
        assert_eq!(s.finalize(), blake3::hash(&bytes));
    }
}
