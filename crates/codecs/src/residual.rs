//! The exact residual (`exact-v1`): what turns a quantized base back into the
//! original bit patterns.
//!
//! For each element with base code `q` and group scale `d`, the base
//! *predicts* the bit pattern `p = FloatDtype::predict_bits(q, d)`. The
//! residual is the difference of order keys `r = key(orig) − key(p)`
//! (wrapping, in the element's width), stored zigzagged. Because `key` is a
//! bijection and the arithmetic wraps, `orig = key⁻¹(key(p) + r)` holds for
//! every bit pattern: NaN payloads, ±Inf, −0 and subnormals included. It is
//! exact by construction, not by floating-point luck.
//!
//! ## Chunk layout
//!
//! A chunk covers whole rows. Elements are split into *classes* by the
//! magnitude of their base code (the residual's spread depends on it: code 0
//! predicts 0, far from most values in key space; large codes predict
//! closely), and each class into little-endian *byte planes*. Stream
//! `(class c, plane p)` holds byte `p` of the zigzagged residual of every
//! element of class `c`, in element order. The chunk is:
//!
//! ```text
//! u32 le  compressed length of stream (0,0), (0,1), … (C−1, W−1)   (C × W entries)
//! bytes   the non-empty streams, in the same order, each one zstd frame
//! ```
//!
//! A class with no elements has an empty stream. A non-empty stream is
//! exactly one zstd frame whose declared content size equals the number of
//! elements of its class, which the decoder counts from the base before
//! decompressing: nothing decompresses past its known size.
//!
//! ## `exact-v2`: split streams
//!
//! The residual kind of format version 4 ([`Kind::V2`]) also allows a
//! stream to be *split* (its table entry has bit 31 set; the length is the
//! low 31 bits): the plane's high nibbles, two to a byte, as one zstd frame,
//! and its low nibbles, two to a byte, stored as they are.
//!
//! ```text
//! u32 le  n: bytes of the plane (elements of the class), n ≥ 1
//! frame   one zstd frame of ⌈n/2⌉ bytes: byte i holds the high nibble of
//!         byte 2i in its low half and that of byte 2i + 1 in its high half
//! bytes   ⌈n/2⌉ bytes: the low nibbles, packed the same way
//! ```
//!
//! For odd `n` the last byte's high half is 0 in both parts. In the byte
//! plane holding a residual's top mantissa bits the low nibble is noise
//! (4.0 bits of entropy in 4) while the high nibble carries the skew: zstd
//! then codes half as many symbols, at the same size.

use crate::base::{block_code, block_scale};
use crate::float::FloatDtype;
use crate::CodecError;
use std::cell::RefCell;
use tpde_format::{BaseCodec, BaseLayout, MAX_ZSTD_WINDOW_LOG};

/// Number of residual classes of a codec.
pub const fn class_count(codec: BaseCodec) -> usize {
    match codec {
        BaseCodec::Q4 => 9,
        BaseCodec::Q8 => 8,
    }
}

/// Class of a base code: `|q|` for q4, `0` or `1 + ⌊log2 |q|⌋` for q8.
#[inline]
pub fn class_of(codec: BaseCodec, q: i32) -> usize {
    let a = q.unsigned_abs();
    match codec {
        BaseCodec::Q4 => a as usize,
        BaseCodec::Q8 => {
            if a == 0 {
                0
            } else {
                (32 - a.leading_zeros()) as usize
            }
        }
    }
}

/// How a chunk's streams are stored: the manifest's residual kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `exact-v1` (format versions 1 to 3): every non-empty stream is one
    /// zstd frame.
    V1,
    /// `exact-v2` (format version 4): a stream may also be split into its
    /// high nibbles (a zstd frame) and its low nibbles (stored).
    V2,
}

impl Kind {
    /// The kind the writer uses.
    pub const CURRENT: Kind = Kind::V2;

    /// The kind a manifest names (`exact-v1`, `exact-v2`).
    pub fn from_name(name: &str) -> Option<Kind> {
        match name {
            "exact-v1" => Some(Kind::V1),
            "exact-v2" => Some(Kind::V2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::V1 => "exact-v1",
            Kind::V2 => "exact-v2",
        }
    }
}

/// Bit 31 of a stream's table entry: the stream is split (`exact-v2`).
const SPLIT: u32 = 1 << 31;

/// Planes shorter than this are never split (the 4-byte header and a
/// second part are not worth it).
const SPLIT_MIN_BYTES: usize = 4096;

/// Zigzag of a `bits`-wide two's-complement value.
#[inline]
pub fn zigzag(r: u64, bits: u32) -> u64 {
    let s = ((r << (64 - bits)) as i64) >> (64 - bits);
    (((s << 1) ^ (s >> 63)) as u64) & mask(bits)
}

/// Inverse of [`zigzag`].
#[inline]
pub fn unzigzag(z: u64, bits: u32) -> u64 {
    ((z >> 1) ^ (z & 1).wrapping_neg()) & mask(bits)
}

#[inline]
const fn mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The residual of one element (zigzagged), by definition.
#[inline]
pub fn residual_of(dtype: FloatDtype, orig_bits: u64, pred_bits: u64) -> u64 {
    let r = dtype
        .order_key(orig_bits)
        .wrapping_sub(dtype.order_key(pred_bits))
        & dtype.mask();
    zigzag(r, dtype.bits())
}

/// The original bits from a prediction and a zigzagged residual.
#[inline]
pub fn apply_residual(dtype: FloatDtype, pred_bits: u64, z: u64) -> u64 {
    let key = dtype
        .order_key(pred_bits)
        .wrapping_add(unzigzag(z, dtype.bits()))
        & dtype.mask();
    dtype.from_order_key(key)
}

fn check_shapes(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src_len: usize,
    base_len: usize,
) -> Result<usize, CodecError> {
    let rb = layout.row_bytes();
    if layout.cols == 0 || rb == 0 || !base_len.is_multiple_of(rb) {
        return Err(CodecError::Shape(format!(
            "base of {base_len} bytes is not whole rows of {rb}"
        )));
    }
    let rows = base_len / rb;
    if rows
        .checked_mul(layout.cols)
        .and_then(|e| e.checked_mul(dtype.width()))
        != Some(src_len)
    {
        return Err(CodecError::Shape(format!(
            "{src_len} original bytes do not match {rows} rows × {} {}",
            layout.cols,
            dtype.name()
        )));
    }
    Ok(rows)
}

/// Per-element zigzagged residuals and classes, by the plain definition.
pub fn residuals_reference(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src: &[u8],
    base: &[u8],
) -> Result<(Vec<u64>, Vec<u8>), CodecError> {
    let rows = check_shapes(dtype, layout, src.len(), base.len())?;
    let rb = layout.row_bytes();
    let mut z = Vec::with_capacity(rows * layout.cols);
    let mut class = Vec::with_capacity(rows * layout.cols);
    for r in 0..rows {
        let row = &base[r * rb..(r + 1) * rb];
        layout.for_each_group(|col, len, off| {
            let d = block_scale(&row[off..]);
            let payload = &row[off + 2..];
            for i in 0..len {
                let q = block_code(layout.codec, payload, i);
                let p = dtype.predict_bits(q, d);
                let o = dtype.load_bits(src, r * layout.cols + col + i);
                z.push(residual_of(dtype, o, p));
                class.push(class_of(layout.codec, q) as u8);
            }
        });
    }
    Ok((z, class))
}

/// Builds the streams of a chunk from per-element residuals and classes.
fn planes_from(dtype: FloatDtype, codec: BaseCodec, z: &[u64], class: &[u8]) -> Vec<Vec<u8>> {
    let w = dtype.width();
    let mut streams = vec![Vec::new(); class_count(codec) * w];
    for (&v, &c) in z.iter().zip(class) {
        for p in 0..w {
            streams[c as usize * w + p].push((v >> (8 * p)) as u8);
        }
    }
    streams
}

/// How a residual stream's frames are made at zstd levels 1 to
/// [`TUNED_UP_TO_LEVEL`]: zstd's `fast` strategy, matches of 7 bytes or
/// more, found through a 64-entry hash table. A residual's byte planes are
/// nearly random, so the short matches zstd's own level-3 settings take
/// cost more than they save. On the MiniLM fixtures this makes the cold
/// tier smaller (BF16 0.452 → 0.448 ×, F32 0.714 → 0.712 × of the original
/// bytes), encodes 20–35 % faster and decodes a few percent faster (fewer
/// sequences); zstd at level 19 reaches 0.447 × at a thirtieth of the
/// speed. Frames stay plain zstd frames: readers see no difference.
///
/// The search also accelerates (target length 256: after each miss it
/// skips further ahead), since it seldom finds a match worth taking; zstd
/// turns Huffman-coded literals off with that setting unless told to keep
/// them, which the last parameter does. Against the search without it, the
/// MiniLM containers are slightly smaller (BF16 32,717,900 → 32,681,046
/// bytes, F32 76,901,192 → 76,888,906) and packing takes 5–7 % less CPU.
const RESIDUAL_MATCHES: [zstd_safe::CParameter; 6] = [
    zstd_safe::CParameter::Strategy(zstd_safe::Strategy::ZSTD_fast),
    zstd_safe::CParameter::MinMatch(7),
    zstd_safe::CParameter::HashLog(6),
    zstd_safe::CParameter::ChainLog(6),
    zstd_safe::CParameter::TargetLength(256),
    zstd_safe::CParameter::LiteralCompressionMode(zstd_safe::ParamSwitch::Enable),
];

/// Levels at which residual streams get `RESIDUAL_MATCHES`; above it
/// (a user asking for a slower search), and at zstd's negative levels,
/// the level's own settings apply.
pub const TUNED_UP_TO_LEVEL: i32 = 3;

/// Which settings a frame is made with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Frames {
    /// zstd's settings for the level.
    Level(i32),
    /// The level with [`RESIDUAL_MATCHES`].
    Residual(i32),
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(Frames, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `data` into one zstd frame that records its content size.
pub fn zstd_compress(data: &[u8], level: i32) -> Result<Vec<u8>, CodecError> {
    compress_frame(data, Frames::Level(level))
}

/// [`zstd_compress`] for a residual stream: with `RESIDUAL_MATCHES` at
/// levels 1 to [`TUNED_UP_TO_LEVEL`].
pub fn zstd_compress_residual(data: &[u8], level: i32) -> Result<Vec<u8>, CodecError> {
    compress_frame(data, residual_frames(level))
}

fn residual_frames(level: i32) -> Frames {
    if (1..=TUNED_UP_TO_LEVEL).contains(&level) {
        Frames::Residual(level)
    } else {
        Frames::Level(level)
    }
}

fn compress_frame(data: &[u8], how: Frames) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    compress_frame_into(&mut out, data, how)?;
    Ok(out)
}

/// Appends one zstd frame of `data` to `out`, compressed in place (into
/// `out`'s spare room, not a buffer of its own then copied).
fn compress_frame_into(out: &mut Vec<u8>, data: &[u8], how: Frames) -> Result<(), CodecError> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(h, _)| *h != how) {
            let (Frames::Level(level) | Frames::Residual(level)) = how;
            let mut comp = zstd::bulk::Compressor::new(level).map_err(CodecError::Zstd)?;
            comp.include_contentsize(true).map_err(CodecError::Zstd)?;
            comp.include_checksum(false).map_err(CodecError::Zstd)?;
            if let Frames::Residual(_) = how {
                for p in RESIDUAL_MATCHES {
                    comp.set_parameter(p).map_err(CodecError::Zstd)?;
                }
            }
            *c = Some((how, comp));
        }
        let (_, comp) = c.as_mut().expect("set above");
        out.reserve(zstd_safe::compress_bound(data.len()));
        let at = out.len();
        let mut cursor = std::io::Cursor::new(&mut *out);
        cursor.set_position(at as u64);
        comp.compress_to_buffer(data, &mut cursor)
            .map_err(CodecError::Zstd)?;
        Ok(())
    })
}

/// Decompresses `frame`, which must be exactly one zstd frame declaring
/// exactly `out.len()` bytes of content, into `out`.
pub fn zstd_decompress_exact(frame: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let n = out.len();
    zstd_decompress_into(frame, out, n)
}

/// Bytes to leave after a frame's `n` bytes of output so that zstd's
/// decoder puts a block's literals there, after the block, and copies
/// them with its fast routines: it needs room for a whole block (at most
/// 128 KiB, and not more than the content), the literals (at most as much)
/// and twice its 32-byte over-copy margin. With an output of exactly `n`
/// bytes it decodes the literals into the end of the output and copies
/// sequences with its careful byte-exact routine instead (7 % of the exact
/// decoder's time).
pub fn zstd_room(n: usize) -> usize {
    2 * n.min(128 << 10) + 128
}

/// [`zstd_decompress_exact`] of a frame declaring exactly `n` bytes into
/// `out[..n]`; the rest of `out` (give it [`zstd_room`]`(n)` bytes) may be
/// overwritten with scratch.
pub fn zstd_decompress_into(frame: &[u8], out: &mut [u8], n: usize) -> Result<(), CodecError> {
    if n > out.len() {
        return Err(CodecError::Shape(format!(
            "{n} bytes do not fit an output of {}",
            out.len()
        )));
    }
    // Frame header: magic (4), descriptor (1), then a window descriptor
    // unless the frame is single-segment. The bulk decoder never allocates a
    // window (it decodes into `out`), but a frame asking for more than the
    // format allows is malformed, so it is refused outright.
    if frame.len() >= 6 && frame[4] & 0x20 == 0 {
        let window_log = 10 + (frame[5] >> 3) as u32;
        if window_log > MAX_ZSTD_WINDOW_LOG {
            return Err(CodecError::Corrupt(format!(
                "zstd frame asks for a 2^{window_log}-byte window (limit 2^{MAX_ZSTD_WINDOW_LOG})"
            )));
        }
    }
    match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(declared)) if declared == n as u64 => {}
        Ok(Some(declared)) => {
            return Err(CodecError::Corrupt(format!(
                "zstd frame declares {declared} bytes, expected {n}"
            )))
        }
        _ => {
            return Err(CodecError::Corrupt(
                "zstd frame without a valid content size".into(),
            ))
        }
    }
    match zstd_safe::find_frame_compressed_size(frame) {
        Ok(len) if len == frame.len() => {}
        Ok(len) => {
            return Err(CodecError::Corrupt(format!(
                "zstd frame is {len} bytes but its stream is {} (trailing bytes)",
                frame.len()
            )))
        }
        Err(_) => {
            return Err(CodecError::Corrupt(
                "truncated or invalid zstd frame".into(),
            ))
        }
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut dec = zstd::bulk::Decompressor::new().map_err(CodecError::Zstd)?;
            dec.window_log_max(MAX_ZSTD_WINDOW_LOG)
                .map_err(CodecError::Zstd)?;
            *d = Some(dec);
        }
        let dec = d.as_mut().expect("set above");
        let got = dec
            .decompress_to_buffer(frame, out)
            .map_err(|e| CodecError::Corrupt(format!("zstd: {e}")))?;
        if got != n {
            return Err(CodecError::Corrupt(format!(
                "zstd frame gave {got} bytes, expected {n}"
            )));
        }
        Ok(())
    })
}

/// Which streams of an `exact-v2` chunk the writer splits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Splits {
    /// Those [`plane_plan`] picks.
    Chosen,
    /// Every non-empty one (valid too; for tests and fuzzing).
    Every,
}

fn frame_streams<S: AsRef<[u8]>>(
    streams: &[S],
    level: i32,
    kind: Kind,
) -> Result<Vec<u8>, CodecError> {
    frame_streams_with(streams, level, kind, Splits::Chosen)
}

fn frame_streams_with<S: AsRef<[u8]>>(
    streams: &[S],
    level: i32,
    kind: Kind,
    splits: Splits,
) -> Result<Vec<u8>, CodecError> {
    // The table first (filled in as the streams are written after it), and
    // room for every stream as it is plus zstd's frame overhead: residual
    // planes seldom shrink by much, and frames are compressed in place.
    let table_len = streams.len() * 4;
    let raw: usize = streams.iter().map(|s| s.as_ref().len() + 64).sum();
    let mut body = Vec::with_capacity(table_len + raw);
    body.resize(table_len, 0);
    for (i, s) in streams.iter().enumerate() {
        let s = s.as_ref();
        if s.is_empty() {
            continue;
        }
        let at = body.len();
        let plan = if all_zero(s) {
            Plane::Zeros
        } else if s.len() < SPLIT_MIN_BYTES {
            Plane::Zstd
        } else {
            plane_plan(s)
        };
        let split = kind == Kind::V2 && (splits == Splits::Every || plan == Plane::Split);
        if split {
            let n = u32::try_from(s.len())
                .map_err(|_| CodecError::Shape("stream over 4 GiB".into()))?;
            body.extend_from_slice(&n.to_le_bytes());
            NIBBLES.with(|b| -> Result<(), CodecError> {
                let (hi, lo) = &mut *b.borrow_mut();
                split_nibbles(s, hi, lo);
                compress_frame_into(&mut body, hi, residual_frames(level))?;
                body.extend_from_slice(lo);
                Ok(())
            })?;
        } else if plan == Plane::Stored {
            push_stored_frame(&mut body, s);
        } else if plan == Plane::Zeros {
            push_zeros_frame(&mut body, s.len());
        } else {
            compress_frame_into(&mut body, s, residual_frames(level))?;
        }
        let len = u32::try_from(body.len() - at)
            .ok()
            .filter(|&l| l < SPLIT)
            .ok_or_else(|| CodecError::Shape("stream over 2 GiB".into()))?;
        let entry = if split { len | SPLIT } else { len };
        body[i * 4..i * 4 + 4].copy_from_slice(&entry.to_le_bytes());
    }
    Ok(body)
}

/// How the writer stores a plane of [`SPLIT_MIN_BYTES`] or more.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plane {
    /// One zstd frame, compressed.
    Zstd,
    /// Split into nibbles (`exact-v2`): the low ones are noise given the
    /// high ones (≥ 3.9 bits of conditional entropy in 4), while the whole
    /// byte is compressible (≤ 7.5 bits).
    Split,
    /// One zstd frame of raw blocks: the bytes are noise (over
    /// [`NOISE_BITS`] bits each), which zstd would store as they are
    /// after looking for matches and sizing a Huffman table in vain.
    Stored,
    /// One zstd frame of run-length blocks of the byte 0: the plane holds
    /// zeros only (the top plane of every class but 0, in BF16 and F32
    /// weights). Decoders tell such a frame from its headers
    /// ([`zstd_frame_is_zeros`]) and need not run zstd over it; zstd's own
    /// frame for zeros is a compressed block, which they cannot tell.
    Zeros,
}

/// Sampled entropy, in bits per byte, above which a plane is stored. Under
/// 1.3 % of gain remains, less than zstd asks of a Huffman table before it
/// uses one (1/64 of the block plus 2 bytes), so zstd would store it too.
const NOISE_BITS: f64 = 7.9;

/// Chooses a plane's form from its byte entropy, measured on 16 evenly
/// spaced runs of 256 bytes with the Miller–Madow correction of a sampled
/// entropy's bias.
fn plane_plan(plane: &[u8]) -> Plane {
    debug_assert!(plane.len() >= SPLIT_MIN_BYTES);
    const RUNS: usize = 16;
    const RUN: usize = 256;
    const N: usize = RUNS * RUN;
    // Four histograms, so that runs of one byte value do not wait on one
    // counter.
    let mut hists = [[0u32; 256]; 4];
    let gap = (plane.len() - RUN) / (RUNS - 1);
    for k in 0..RUNS {
        for q in plane[k * gap..k * gap + RUN].chunks_exact(4) {
            for (h, &b) in hists.iter_mut().zip(q) {
                h[b as usize] += 1;
            }
        }
    }
    let mut hist = [0u32; 256];
    for h in &hists {
        for (a, &c) in hist.iter_mut().zip(h) {
            *a += c;
        }
    }
    let mut high = [0u32; 16];
    for (b, &c) in hist.iter().enumerate() {
        high[b >> 4] += c;
    }
    // c·log2(c) for every count a sample can reach.
    static C_LOG_C: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let clogc = C_LOG_C.get_or_init(|| {
        (0..=N)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    c as f64 * (c as f64).log2()
                }
            })
            .collect()
    });
    // Bits per symbol, with the Miller–Madow correction.
    let entropy = |counts: &[u32]| {
        let seen = counts.iter().filter(|&&c| c > 0).count();
        let sum: f64 = counts.iter().map(|&c| clogc[c as usize]).sum();
        (N as f64).log2() - sum / N as f64
            + (seen as f64 - 1.0) / (2.0 * N as f64 * std::f64::consts::LN_2)
    };
    let h8 = entropy(&hist);
    if h8 > NOISE_BITS {
        Plane::Stored
    } else if h8 <= 7.5 && h8 - entropy(&high) >= 3.9 {
        Plane::Split
    } else {
        Plane::Zstd
    }
}

/// Appends `data` (not empty) to `out` as one zstd frame of raw blocks
/// (RFC 8878 §3.1.1): a single-segment header declaring the content size,
/// then blocks of at most 128 KiB, each a 3-byte header and the bytes.
fn push_stored_frame(out: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(!data.is_empty());
    push_frame_header(out, data.len() as u64);
    out.reserve(data.len() + data.len().div_ceil(BLOCK) * 3);
    let mut blocks = data.chunks(BLOCK).peekable();
    while let Some(b) = blocks.next() {
        // Last_Block (bit 0), Block_Type 0 = raw (bits 2-1), Block_Size.
        let last = u32::from(blocks.peek().is_none());
        let header = last | ((b.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
}

/// The largest block of a zstd frame (RFC 8878 §3.1.1.2.3).
const BLOCK: usize = 128 << 10;

/// Appends `n` (not 0) zeros to `out` as one zstd frame of run-length
/// blocks (RFC 8878 §3.1.1.2.2, `Block_Type` 1): a single-segment header
/// declaring the content size, then blocks of at most 128 KiB, each a
/// 3-byte header and the byte 0.
fn push_zeros_frame(out: &mut Vec<u8>, n: usize) {
    debug_assert!(n > 0);
    push_frame_header(out, n as u64);
    let mut left = n;
    while left > 0 {
        let b = left.min(BLOCK);
        left -= b;
        // Last_Block (bit 0), Block_Type 1 = RLE (bits 2-1), Block_Size.
        let header = u32::from(left == 0) | 2 | ((b as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.push(0);
    }
}

/// Appends the header of a single-segment zstd frame of `n` bytes: the
/// magic number, then the descriptor (Single_Segment, bit 5, and the size
/// of the Frame_Content_Size field, bits 7-6; no checksum, no dictionary)
/// and that field.
fn push_frame_header(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    match n {
        0..=255 => out.extend_from_slice(&[0x20, n as u8]),
        256..=65_791 => {
            out.push(0x60);
            out.extend_from_slice(&((n - 256) as u16).to_le_bytes());
        }
        _ if n <= u64::from(u32::MAX) => {
            out.push(0xA0);
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        _ => {
            out.push(0xE0);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

/// Whether `b` holds zeros only (wide ORs, which the compiler vectorizes;
/// a plane with a byte other than 0 usually ends the scan in its first
/// 256 bytes).
fn all_zero(b: &[u8]) -> bool {
    b.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// A plane's high nibbles and its low nibbles, two to a byte (element
/// `2i` in the low half of byte `i`), into `hi` and `lo` (resized); for an
/// odd length the last byte's high half is 0.
fn split_nibbles(plane: &[u8], hi: &mut Vec<u8>, lo: &mut Vec<u8>) {
    let half = plane.len().div_ceil(2);
    hi.resize(half, 0);
    lo.resize(half, 0);
    // Whole 64-byte blocks in AVX-512 registers, the rest as the reference.
    let wide = if gather_avx512::available() {
        plane.len() / 64 * 64
    } else {
        0
    };
    if wide > 0 {
        // SAFETY: the features are present; `wide` bytes of `plane` and
        // `wide / 2` of each output.
        unsafe { gather_avx512::split_nibbles64(&plane[..wide], hi, lo) };
    }
    split_nibbles_scalar(&plane[wide..], &mut hi[wide / 2..], &mut lo[wide / 2..]);
}

/// [`split_nibbles`] one pair at a time, into outputs of `⌈plane.len()/2⌉`
/// bytes each: the reference of the AVX-512 path.
fn split_nibbles_scalar(plane: &[u8], hi: &mut [u8], lo: &mut [u8]) {
    let half = plane.len().div_ceil(2);
    for ((p, h), l) in plane.chunks_exact(2).zip(hi.iter_mut()).zip(lo.iter_mut()) {
        *h = (p[0] >> 4) | (p[1] & 0xF0);
        *l = (p[0] & 0x0F) | (p[1] << 4);
    }
    if let [.., last] = plane {
        if plane.len() % 2 == 1 {
            hi[half - 1] = last >> 4;
            lo[half - 1] = last & 0x0F;
        }
    }
}

/// Inverse of [`split_nibbles`] into `out` (`⌈out.len()/2⌉` bytes of each
/// part): whole 64-byte blocks of `out` in AVX-512 registers, the rest as
/// the reference.
fn join_nibbles(hi: &[u8], lo: &[u8], out: &mut [u8]) {
    let wide = if gather_avx512::available() {
        out.len() / 64 * 64
    } else {
        0
    };
    if wide > 0 {
        // SAFETY: the features are present; `wide` bytes of `out` and
        // `wide / 2` of each part (which hold `⌈out.len()/2⌉`).
        unsafe {
            gather_avx512::join_nibbles64(&hi[..wide / 2], &lo[..wide / 2], &mut out[..wide])
        };
    }
    join_nibbles_scalar(&hi[wide / 2..], &lo[wide / 2..], &mut out[wide..]);
}

/// [`join_nibbles`] one pair at a time: the reference of the AVX-512 path.
fn join_nibbles_scalar(hi: &[u8], lo: &[u8], out: &mut [u8]) {
    let pairs = out.len() / 2;
    for ((o, &h), &l) in out.chunks_exact_mut(2).zip(&hi[..pairs]).zip(&lo[..pairs]) {
        o[0] = (h << 4) | (l & 0x0F);
        o[1] = (h & 0xF0) | (l >> 4);
    }
    if out.len() % 2 == 1 {
        out[2 * pairs] = (hi[pairs] << 4) | (lo[pairs] & 0x0F);
    }
}

/// The parts of a split stream, checked: `n` (at least 1), the zstd frame
/// of the high nibbles (its exact extent, not yet decompressed), and the
/// low nibbles, whose unused half byte (odd `n`) must be 0.
fn split_parts(stream: &[u8], i: usize) -> Result<(usize, &[u8], &[u8]), CodecError> {
    let bad = |m: String| CodecError::Corrupt(format!("split stream {i}: {m}"));
    if stream.len() < 4 {
        return Err(bad(format!(
            "{} bytes, shorter than its header",
            stream.len()
        )));
    }
    let n = u32::from_le_bytes(stream[..4].try_into().expect("4 bytes")) as usize;
    if n == 0 {
        return Err(bad("holds no elements".into()));
    }
    let half = n.div_ceil(2);
    let rest = &stream[4..];
    let frame_len = rest.len().checked_sub(half).ok_or_else(|| {
        bad(format!(
            "{} bytes cannot hold {half} bytes of low nibbles",
            stream.len()
        ))
    })?;
    let (frame, lo) = rest.split_at(frame_len);
    if n % 2 == 1 && lo[half - 1] >> 4 != 0 {
        return Err(bad("the padding nibble is not 0".into()));
    }
    Ok((n, frame, lo))
}

thread_local! {
    /// The high and low nibbles of a split stream being made or decoded
    /// on this thread.
    static NIBBLES: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Decodes stream `i` of the chunk (a zstd frame, or a split stream when
/// `split`) into `out`, which is the plane's exact length.
fn decode_stream(stream: &[u8], split: bool, i: usize, out: &mut [u8]) -> Result<(), CodecError> {
    let n = out.len();
    decode_stream_into(stream, split, i, out, n)
}

/// [`decode_stream`] into `out[..n]`, the bytes of `out` after them free
/// for zstd to use (see [`zstd_decompress_into`]).
fn decode_stream_into(
    stream: &[u8],
    split: bool,
    i: usize,
    out: &mut [u8],
    want: usize,
) -> Result<(), CodecError> {
    if !split {
        return zstd_decompress_into(stream, out, want);
    }
    let (n, frame, lo) = split_parts(stream, i)?;
    if n != want {
        return Err(CodecError::Corrupt(format!(
            "split stream {i} holds {n} elements, its class {want}"
        )));
    }
    let out = &mut out[..n];
    NIBBLES.with(|b| {
        let (hi, _) = &mut *b.borrow_mut();
        let half = n.div_ceil(2);
        let room = half + zstd_room(half);
        if hi.len() < room {
            hi.resize(room, 0);
        }
        zstd_decompress_into(frame, hi, half)?;
        if n % 2 == 1 && hi[half - 1] >> 4 != 0 {
            return Err(CodecError::Corrupt(format!(
                "split stream {i}: the padding nibble is not 0"
            )));
        }
        join_nibbles(&hi[..half], lo, out);
        Ok(())
    })
}

/// Reference encoder: the plain definition, element by element.
pub fn encode_reference(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src: &[u8],
    base: &[u8],
    level: i32,
    kind: Kind,
) -> Result<Vec<u8>, CodecError> {
    let (z, class) = residuals_reference(dtype, layout, src, base)?;
    frame_streams(&planes_from(dtype, layout.codec, &z, &class), level, kind)
}

/// An `exact-v2` chunk in which every non-empty stream is split, by the
/// reference path: valid, but not what the writer makes (it splits only
/// where it pays). For tests and fuzzing of the split streams' decoders.
#[doc(hidden)]
pub fn encode_every_stream_split(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src: &[u8],
    base: &[u8],
    level: i32,
) -> Result<Vec<u8>, CodecError> {
    let (z, class) = residuals_reference(dtype, layout, src, base)?;
    let planes = planes_from(dtype, layout.codec, &z, &class);
    frame_streams_with(&planes, level, Kind::V2, Splits::Every)
}

/// Fast encoder used by the pipeline; output identical to [`encode_reference`].
pub fn encode(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src: &[u8],
    base: &[u8],
    level: i32,
    kind: Kind,
) -> Result<Vec<u8>, CodecError> {
    let rows = check_shapes(dtype, layout, src.len(), base.len())?;
    let counts = count_classes_fast(layout, base, rows)?;
    let w = dtype.width();
    // Each plane is followed by PLANE_SLACK spare bytes: the SIMD scatter
    // stores whole vectors at a plane's cursor, and what lands past the
    // cursor is overwritten by the plane's next bytes or falls in the slack.
    let mut offsets = Vec::with_capacity(counts.len() * w);
    let mut total = 0;
    for &n in &counts {
        for _ in 0..w {
            offsets.push(total);
            total += n + PLANE_SLACK;
        }
    }
    let mut planes = vec![0u8; total];
    match dtype.width() {
        2 => scatter::<2>(
            dtype,
            layout,
            src,
            base,
            rows,
            &offsets,
            &counts,
            &mut planes,
        ),
        4 => scatter::<4>(
            dtype,
            layout,
            src,
            base,
            rows,
            &offsets,
            &counts,
            &mut planes,
        ),
        _ => scatter::<8>(
            dtype,
            layout,
            src,
            base,
            rows,
            &offsets,
            &counts,
            &mut planes,
        ),
    }
    let streams: Vec<&[u8]> = (0..counts.len() * w)
        .map(|i| &planes[offsets[i]..offsets[i] + counts[i / w]])
        .collect();
    frame_streams(&streams, level, kind)
}

/// Start of plane `(class, byte)` at index `class * w + byte` in one buffer
/// holding all planes, and that buffer's length.
fn plane_offsets(counts: &[usize], w: usize) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(counts.len() * w);
    let mut at = 0;
    for &n in counts {
        for _ in 0..w {
            offsets.push(at);
            at += n;
        }
    }
    (offsets, at)
}

/// Order key with the width known at compile time (branch-free form of
/// [`FloatDtype::order_key`]).
#[inline(always)]
fn key_w<const W: usize>(b: u64) -> u64 {
    let bits = (W * 8) as u32;
    let m = mask(bits);
    let s = 1u64 << (bits - 1);
    let neg = (b >> (bits - 1)) & 1;
    b ^ (s | (neg.wrapping_neg() & m))
}

/// Inverse of [`key_w`].
#[inline(always)]
fn unkey_w<const W: usize>(k: u64) -> u64 {
    let bits = (W * 8) as u32;
    let m = mask(bits);
    let s = 1u64 << (bits - 1);
    let pos = (k >> (bits - 1)) & 1;
    k ^ (s | ((pos ^ 1).wrapping_neg() & m))
}

#[inline(always)]
fn load_w<const W: usize>(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..W].copy_from_slice(&b[..W]);
    u64::from_le_bytes(a)
}

/// Order keys of the 16 q4 predictions of a group.
#[inline(always)]
fn q4_key_table<const W: usize>(dtype: FloatDtype, d: half::f16) -> [u64; 16] {
    let mut t = [0u64; 16];
    match dtype {
        FloatDtype::BF16 if d.is_finite() => {
            // In a loop the compiler vectorizes: round to nearest even
            // without the NaN case of `bf16_bits_rne` (a code times a finite
            // scale is never NaN), then the key without a branch.
            let df = d.to_f32();
            let mut k16 = [0u16; 16];
            for (n, e) in k16.iter_mut().enumerate() {
                let b = (Q4_VALUES[n] * df).to_bits();
                let r = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
                *e = r ^ (((r as i16 >> 15) as u16) | 0x8000);
            }
            for (e, k) in t.iter_mut().zip(k16) {
                *e = u64::from(k);
            }
        }
        _ => {
            for (n, e) in t.iter_mut().enumerate() {
                *e = key_w::<W>(dtype.predict_bits(n as i32 - 8, d));
            }
        }
    }
    t
}

const Q4_CLASS: [usize; 16] = [8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7];

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scatter<const W: usize>(
    dtype: FloatDtype,
    layout: &BaseLayout,
    src: &[u8],
    base: &[u8],
    rows: usize,
    offsets: &[usize],
    counts: &[usize],
    planes: &mut [u8],
) {
    let bits = (W * 8) as u32;
    let rb = layout.row_bytes();
    // Absolute write position of each class's first plane; plane `p` of the
    // class is `p * stride[class]` further on.
    let mut cur = [0usize; 9];
    let mut stride = [0usize; 9];
    for c in 0..counts.len() {
        cur[c] = offsets[c * W];
        stride[c] = if W > 1 {
            offsets[c * W + 1] - offsets[c * W]
        } else {
            0
        };
    }
    assert!(
        (0..counts.len()).all(
            |c| offsets[c * W] + (W - 1) * stride[c] + counts[c] + PLANE_SLACK <= planes.len()
        ),
        "every plane has its slack"
    );
    let wide = (W == 2 || W == 4) && layout.codec == BaseCodec::Q4 && gather_avx512::available();
    // Rows of whole q4 groups of 64 BF16 or F32 values: one AVX-512 loop
    // over their blocks, as the decoder's. Every scale is finite: `encode`
    // counted the classes first, which refuses a base with a non-finite one.
    let blocks = wide
        && layout.group == 64
        && layout.cols.is_multiple_of(64)
        && matches!(dtype, FloatDtype::BF16 | FloatDtype::F16 | FloatDtype::F32);
    if blocks {
        let (base, src) = (&base[..rows * rb], &src[..rows * layout.cols * W]);
        // SAFETY: the features are present; `base` is whole 34-byte blocks
        // and `src` 64 values per block; every plane has its slack
        // (asserted above).
        unsafe {
            match gather_avx512::Half::of(dtype) {
                Some(half) => {
                    gather_avx512::scatter_blocks64_w2(half, base, src, &mut cur, &stride, planes)
                }
                None => gather_avx512::scatter_blocks64_f32(base, src, &mut cur, &stride, planes),
            }
        }
    }
    for (row, srow) in base
        .chunks_exact(rb)
        .take(if blocks { 0 } else { rows })
        .zip(src.chunks_exact(layout.cols * W))
    {
        layout.for_each_group(|col, len, off| {
            let d = block_scale(&row[off..]);
            let payload = &row[off + 2..off + layout.block_bytes(len)];
            let vals = &srow[col * W..(col + len) * W];
            let mut put = |v: &[u8], class: usize, pred_key: u64| {
                let z = zigzag(key_w::<W>(load_w::<W>(v)).wrapping_sub(pred_key), bits);
                let at = cur[class];
                cur[class] = at + 1;
                for p in 0..W {
                    planes[at + p * stride[class]] = (z >> (8 * p)) as u8;
                }
            };
            match layout.codec {
                BaseCodec::Q4 => {
                    if wide && len == 64 && d.is_finite() {
                        // SAFETY: as below; the keys are computed in
                        // registers as `q4_key_table` computes them.
                        match dtype {
                            FloatDtype::BF16 => {
                                unsafe {
                                    gather_avx512::scatter64_bf16(
                                        d.to_f32(),
                                        payload,
                                        vals,
                                        &mut cur,
                                        &stride,
                                        planes,
                                    )
                                }
                                return;
                            }
                            FloatDtype::F32 => {
                                unsafe {
                                    gather_avx512::scatter64_f32(
                                        d.to_f32(),
                                        payload,
                                        vals,
                                        &mut cur,
                                        &stride,
                                        planes,
                                    )
                                }
                                return;
                            }
                            _ => {}
                        }
                    }
                    let table = q4_key_table::<W>(dtype, d);
                    if wide && len == 64 {
                        // SAFETY: the features are present; `payload` is 32
                        // bytes and `vals` 64 × W; every plane is followed by
                        // its slack (asserted above), and a class's cursor
                        // never passes its count (the counts are the base's).
                        unsafe {
                            if W == 2 {
                                let keys: [u16; 16] = std::array::from_fn(|k| table[k] as u16);
                                gather_avx512::scatter64_w2(
                                    &keys, payload, vals, &mut cur, &stride, planes,
                                );
                            } else {
                                let keys: [u32; 16] = std::array::from_fn(|k| table[k] as u32);
                                gather_avx512::scatter64_w4(
                                    &keys, payload, vals, &mut cur, &stride, planes,
                                );
                            }
                        }
                        return;
                    }
                    for (i, v) in vals.chunks_exact(W).enumerate() {
                        let n = ((payload[i / 2] >> (4 * (i % 2))) & 15) as usize;
                        put(v, Q4_CLASS[n], table[n]);
                    }
                }
                BaseCodec::Q8 => {
                    for (v, &b) in vals.chunks_exact(W).zip(payload) {
                        let q = b as i8 as i32;
                        put(
                            v,
                            class_of(BaseCodec::Q8, q),
                            key_w::<W>(dtype.predict_bits(q, d)),
                        );
                    }
                }
            }
        });
    }
}

/// [`count_classes`] for the fast encoder: a base of whole q4 groups of 64
/// counts its classes in AVX-512 registers (the same answer, tested);
/// any other falls back to the reference.
fn count_classes_fast(
    layout: &BaseLayout,
    base: &[u8],
    rows: usize,
) -> Result<Vec<usize>, CodecError> {
    let whole_groups = layout.codec == BaseCodec::Q4
        && layout.group == 64
        && layout.cols.is_multiple_of(64)
        && gather_avx512::available();
    if !whole_groups {
        return count_classes(layout, base, rows);
    }
    let base = &base[..rows * layout.row_bytes()];
    let mut counts = [0usize; 9];
    // SAFETY: the features are present; every row is whole 34-byte blocks.
    let bad_scale = unsafe { gather_avx512::count_q4_64(base, &mut counts) };
    if bad_scale {
        return Err(CodecError::Corrupt(
            "non-finite group scale in the base".into(),
        ));
    }
    Ok(counts.to_vec())
}

/// Counts elements per class in whole rows of a base: one histogram of all
/// base bytes (four interleaved tables, so equal neighbours do not
/// serialize on one counter), minus the scale bytes, folded into classes.
fn count_classes(layout: &BaseLayout, base: &[u8], rows: usize) -> Result<Vec<usize>, CodecError> {
    let rb = layout.row_bytes();
    let base = &base[..rows * rb];
    let mut hist = [[0u32; 256]; 4];
    let mut quads = base.chunks_exact(4);
    for q in &mut quads {
        hist[0][q[0] as usize] += 1;
        hist[1][q[1] as usize] += 1;
        hist[2][q[2] as usize] += 1;
        hist[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        hist[0][b as usize] += 1;
    }
    let mut total = [0usize; 256];
    for (b, t) in total.iter_mut().enumerate() {
        *t = (hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b]) as usize;
    }
    // Odd-length q4 groups end with an unused high nibble, which must be 0
    // and which the histogram counts as a code −8: subtract those too.
    let odd_groups = layout.codec == BaseCodec::Q4
        && (layout.group % 2 == 1 || layout.cols % layout.group % 2 == 1);
    let mut pad_nibbles = 0usize;
    let mut bad_pad = false;
    let mut bad_scale = false;
    for row in base.chunks_exact(rb) {
        layout.for_each_group(|_, len, off| {
            total[row[off] as usize] -= 1;
            total[row[off + 1] as usize] -= 1;
            // A non-finite scale would make predictions depend on the
            // processor (0 × Inf is a NaN of unspecified sign).
            bad_scale |= row[off + 1] & 0x7C == 0x7C;
            if odd_groups && len % 2 == 1 {
                pad_nibbles += 1;
                bad_pad |= row[off + layout.block_bytes(len) - 1] >> 4 != 0;
            }
        });
    }
    if bad_pad {
        return Err(CodecError::Corrupt(
            "non-zero padding nibble in a q4 base".into(),
        ));
    }
    if bad_scale {
        return Err(CodecError::Corrupt(
            "non-finite group scale in the base".into(),
        ));
    }
    if layout.codec == BaseCodec::Q8 && total[0x80] > 0 {
        return Err(CodecError::Corrupt(
            "q8 code -128 in the base (codes are -127..=127)".into(),
        ));
    }
    let mut counts = vec![0usize; class_count(layout.codec)];
    for (b, &n) in total.iter().enumerate() {
        if n == 0 {
            continue;
        }
        match layout.codec {
            BaseCodec::Q4 => {
                counts[Q4_CLASS[b & 15]] += n;
                counts[Q4_CLASS[b >> 4]] += n;
            }
            BaseCodec::Q8 => counts[class_of(BaseCodec::Q8, b as u8 as i8 as i32)] += n,
        }
    }
    counts[class_of(layout.codec, layout.codec.q_min())] -= pad_nibbles;
    Ok(counts)
}

/// A stream's table entry: its stored length and whether it is split
/// (`exact-v2` only: under `exact-v1` bit 31 is refused).
fn table_entry(chunk: &[u8], i: usize, kind: Kind) -> Result<(usize, bool), CodecError> {
    let e = u32::from_le_bytes(chunk[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    let split = e & SPLIT != 0;
    match (split, kind) {
        (true, Kind::V1) => Err(CodecError::Corrupt(format!(
            "stream {i}: a split stream, which exact-v1 does not have"
        ))),
        (true, _) if e == SPLIT => Err(CodecError::Corrupt(format!(
            "stream {i}: a split stream of 0 bytes"
        ))),
        _ => Ok(((e & !SPLIT) as usize, split)),
    }
}

/// Splits a chunk into its streams (and whether each is split) after
/// checking the stream table.
fn split_streams(
    chunk: &[u8],
    n_streams: usize,
    expected: impl Fn(usize) -> usize,
    kind: Kind,
) -> Result<Vec<(&[u8], bool)>, CodecError> {
    let table_len = n_streams * 4;
    if chunk.len() < table_len {
        return Err(CodecError::Corrupt(format!(
            "residual chunk of {} bytes is shorter than its stream table ({table_len})",
            chunk.len()
        )));
    }
    let mut at = table_len;
    let mut out = Vec::with_capacity(n_streams);
    for i in 0..n_streams {
        let (len, split) = table_entry(chunk, i, kind)?;
        if (len == 0) != (expected(i) == 0) {
            return Err(CodecError::Corrupt(format!(
                "stream {i} is {len} bytes but its class has {} elements",
                expected(i)
            )));
        }
        let end = at
            .checked_add(len)
            .filter(|&e| e <= chunk.len())
            .ok_or_else(|| {
                CodecError::Corrupt(format!("stream {i} runs past the end of the chunk"))
            })?;
        out.push((&chunk[at..end], split));
        at = end;
    }
    if at != chunk.len() {
        return Err(CodecError::Corrupt(format!(
            "{} trailing bytes after the last stream",
            chunk.len() - at
        )));
    }
    Ok(out)
}

/// Decompresses every stream of a chunk into `planes` (resized to fit),
/// laid out as [`plane_offsets`] says; returns the offsets.
fn decompress_planes(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    rows: usize,
    chunk: &[u8],
    planes: &mut Vec<u8>,
    kind: Kind,
) -> Result<(Vec<usize>, Vec<usize>), CodecError> {
    let w = dtype.width();
    let counts = count_classes(layout, base, rows)?;
    let streams = split_streams(chunk, counts.len() * w, |i| counts[i / w], kind)?;
    let (offsets, total) = plane_offsets(&counts, w);
    // Every byte is overwritten by the frames below, so a reused buffer
    // only grows; it is never cleared.
    if planes.len() < total {
        planes.resize(total, 0);
    }
    for (i, &(s, split)) in streams.iter().enumerate() {
        let n = counts[i / w];
        if n > 0 {
            decode_stream(s, split, i, &mut planes[offsets[i]..offsets[i] + n])?;
        }
    }
    Ok((offsets, counts))
}

/// [`decompress_planes`] for the fast decoder: the class counts come from
/// the frames' declared content sizes instead of a pass over the base (the
/// planes of a class must declare the same count, and the counts must add
/// up to the chunk's elements, which bounds what is allocated). Whether they
/// are the base's counts is checked by [`gather`], which consumes exactly
/// the base's elements of each class and refuses to read past a class's
/// planes: together the same rule as counting the base first.
///
/// With `skip_tops`, when the top plane of every class but 0 is empty or a
/// frame of zeros ([`zstd_frame_is_zeros`]), those planes are left as the
/// buffer had them (the fast gather skips them), and the answer's third
/// part is true.
fn decompress_planes_by_frames(
    dtype: FloatDtype,
    layout: &BaseLayout,
    rows: usize,
    chunk: &[u8],
    planes: &mut Vec<u8>,
    kind: Kind,
    skip_tops: bool,
) -> Result<(Vec<usize>, Vec<usize>, bool), CodecError> {
    let w = dtype.width();
    let classes = class_count(layout.codec);
    let n_streams = classes * w;
    let table_len = n_streams * 4;
    if chunk.len() < table_len {
        return Err(CodecError::Corrupt(format!(
            "residual chunk of {} bytes is shorter than its stream table ({table_len})",
            chunk.len()
        )));
    }
    let mut counts = vec![0usize; classes];
    let mut at = table_len;
    // Streams that are frames of zeros, and whether every top plane of
    // classes 1 and up is one (or empty).
    let mut zeros = vec![false; n_streams];
    let mut tops = true;
    for (c, count) in counts.iter_mut().enumerate() {
        for j in 0..w {
            let i = c * w + j;
            let (len, split) = table_entry(chunk, i, kind)?;
            let end = at
                .checked_add(len)
                .filter(|&e| e <= chunk.len())
                .ok_or_else(|| {
                    CodecError::Corrupt(format!("stream {i} runs past the end of the chunk"))
                })?;
            let n = if len == 0 {
                0
            } else if split {
                split_parts(&chunk[at..end], i)?.0
            } else {
                match zstd_safe::get_frame_content_size(&chunk[at..end]) {
                    Ok(Some(n)) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
                    _ => {
                        return Err(CodecError::Corrupt(format!(
                            "stream {i}: zstd frame without a valid content size"
                        )))
                    }
                }
            };
            zeros[i] = !split && n > 0 && zstd_frame_is_zeros(&chunk[at..end], n);
            if c > 0 && j == w - 1 {
                tops &= n == 0 || zeros[i];
            }
            if j == 0 {
                *count = n;
            } else if n != *count {
                return Err(CodecError::Corrupt(format!(
                    "stream {i} holds {n} elements but stream {} of its class holds {}",
                    c * w,
                    *count
                )));
            }
            at = end;
        }
    }
    if at != chunk.len() {
        return Err(CodecError::Corrupt(format!(
            "{} trailing bytes after the last stream",
            chunk.len() - at
        )));
    }
    let elements = rows * layout.cols;
    let total = counts
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .unwrap_or(usize::MAX);
    if total != elements {
        return Err(CodecError::Corrupt(format!(
            "the residual's streams hold {total} elements, the base {elements}"
        )));
    }
    let (offsets, total) = plane_offsets(&counts, w);
    // Each plane is decoded with the buffer after it as zstd's room (the
    // planes after it are decoded later); the last one has room of its own.
    let largest = counts.iter().copied().max().unwrap_or(0);
    let len = total + PLANE_SLACK.max(zstd_room(largest));
    if planes.len() < len {
        planes.resize(len, 0);
    }
    let skip = skip_tops && tops;
    let mut at = table_len;
    for (i, &off) in offsets.iter().enumerate() {
        let (len, split) = table_entry(chunk, i, kind)?;
        let n = counts[i / w];
        if zeros[i] {
            if !(skip && i / w > 0 && i % w == w - 1) {
                planes[off..off + n].fill(0);
            }
        } else if n > 0 {
            decode_stream_into(&chunk[at..at + len], split, i, &mut planes[off..], n)?;
        }
        at += len;
    }
    Ok((offsets, counts, skip))
}

/// Whether the top byte plane of every class but 0 holds zeros only in
/// this residual chunk (of `rows` rows of a decomposed tensor of `dtype`
/// in `layout`, stored as `kind`): so it is in every chunk of the MiniLM
/// fixtures, BF16 and F32 (a prediction from a code other than 0 is within
/// a few steps of the value, and the residual's top byte is 0). The fast
/// gather then skips those planes: one expand-load in two less for most
/// BF16 elements, one in four for F32. An empty class counts as zero.
pub fn top_planes_zero(
    dtype: FloatDtype,
    layout: &BaseLayout,
    rows: usize,
    chunk: &[u8],
    kind: Kind,
) -> Result<bool, CodecError> {
    let mut planes = Vec::new();
    let (offsets, counts, _) =
        decompress_planes_by_frames(dtype, layout, rows, chunk, &mut planes, kind, false)?;
    Ok(top_zero(dtype.width(), &offsets, &counts, &planes))
}

/// [`top_planes_zero`] on decoded planes (`offsets`, `counts`: as
/// [`decompress_planes_by_frames`] returns them): a pass over the top
/// planes of classes 1 and up, in the cache just after their decode.
fn top_zero(w: usize, offsets: &[usize], counts: &[usize], planes: &[u8]) -> bool {
    (1..counts.len()).all(|c| {
        let at = offsets[c * w + w - 1];
        all_zero(&planes[at..at + counts[c]])
    })
}

/// Whether the zstd frame `f` is a frame of `n` zeros as
/// [`push_zeros_frame`] writes them, read from its headers alone: a
/// single-segment frame declaring `n` bytes, with neither dictionary nor
/// checksum, whose blocks are all run-length blocks of the byte 0 of at
/// most 128 KiB, adding up to `n`, and which ends after the last of them
/// (RFC 8878 §3.1.1). Such a frame decodes to `n` zeros, so zstd need not
/// run over it. Anything else is `false`, and zstd decodes and judges it.
fn zstd_frame_is_zeros(f: &[u8], n: usize) -> bool {
    if n == 0 || f.len() < 6 || f[..4] != 0xFD2F_B528u32.to_le_bytes() {
        return false;
    }
    let fhd = f[4];
    // Single_Segment (bit 5) set; reserved bit 3, Content_Checksum (bit 2)
    // and Dictionary_ID (bits 1-0) clear; bit 4 is unused, ignored.
    if fhd & 0x2F != 0x20 {
        return false;
    }
    let le = |a: usize, k: usize| -> Option<u64> {
        let b = f.get(a..a + k)?;
        Some(b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x)))
    };
    let (declared, mut at) = match fhd >> 6 {
        0 => (le(5, 1), 6),
        1 => (le(5, 2).map(|v| v + 256), 7),
        2 => (le(5, 4), 9),
        _ => (le(5, 8), 13),
    };
    if declared != Some(n as u64) {
        return false;
    }
    let mut total = 0u64;
    loop {
        let Some(h) = le(at, 3) else {
            return false;
        };
        let size = h >> 3;
        // Block_Type 1 (bits 2-1): run-length, its one byte 0.
        if (h >> 1) & 3 != 1 || size > BLOCK as u64 || f.get(at + 3) != Some(&0) {
            return false;
        }
        total += size;
        at += 4;
        if h & 1 == 1 {
            return total == n as u64 && at == f.len();
        }
    }
}

/// Bytes after the last plane that the fast gather may read (never use):
/// one group's worth, for a cursor that ran past its class.
const PLANE_SLACK: usize = 64;

thread_local! {
    /// Decoded planes of the chunk being rebuilt on this thread.
    static PLANES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reference decoder: rebuilds the original bytes element by element.
pub fn decode_reference(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    chunk: &[u8],
    out: &mut [u8],
    kind: Kind,
) -> Result<(), CodecError> {
    let rows = check_shapes(dtype, layout, out.len(), base.len())?;
    let mut planes = Vec::new();
    let (offsets, _) = decompress_planes(dtype, layout, base, rows, chunk, &mut planes, kind)?;
    let w = dtype.width();
    let mut cursor = vec![0usize; class_count(layout.codec)];
    let rb = layout.row_bytes();
    for r in 0..rows {
        let row = &base[r * rb..(r + 1) * rb];
        layout.for_each_group(|col, len, off| {
            let d = block_scale(&row[off..]);
            let payload = &row[off + 2..];
            for i in 0..len {
                let q = block_code(layout.codec, payload, i);
                let c = class_of(layout.codec, q);
                let mut z = 0u64;
                for p in 0..w {
                    z |= (planes[offsets[c * w + p] + cursor[c]] as u64) << (8 * p);
                }
                cursor[c] += 1;
                let bits = apply_residual(dtype, dtype.predict_bits(q, d), z);
                dtype.store_bits(out, r * layout.cols + col + i, bits);
            }
        });
    }
    Ok(())
}

/// How the fast paths store the values they rebuild into `out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stores {
    /// Plain stores: the values stay in the cache for whoever reads them
    /// next (a digest, a copy). The default.
    #[default]
    Cached,
    /// Whole 64-byte lines of `out` stored past the cache (non-temporal
    /// stores) wherever `out` lies on them, plain stores elsewhere: for a
    /// large output read later, such as a loader's step buffer. The cache
    /// then does not read each line in before overwriting it. On this
    /// project's 2-core VM, F32 base values into a 90 MB buffer went from
    /// 10 to 21 GB/s on one core. The function fences its stores before
    /// it returns.
    PastCache,
}

/// Fast decoder used by the pipeline; output identical to [`decode_reference`].
pub fn decode(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    chunk: &[u8],
    out: &mut [u8],
    kind: Kind,
) -> Result<(), CodecError> {
    decode_timed(dtype, layout, base, chunk, out, kind, Stores::Cached).map(|_| ())
}

/// [`decode`], storing as `stores` says and also returning how long its
/// two stages took: decompressing the residual's zstd frames, and
/// reconstructing the values from the base's predictions and the
/// residuals.
pub fn decode_timed(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    chunk: &[u8],
    out: &mut [u8],
    kind: Kind,
    stores: Stores,
) -> Result<(std::time::Duration, std::time::Duration), CodecError> {
    let nt = stores == Stores::PastCache;
    let rows = check_shapes(dtype, layout, out.len(), base.len())?;
    PLANES.with(|p| {
        let planes = &mut *p.borrow_mut();
        let t0 = std::time::Instant::now();
        // The fast gather over whole q4 blocks skips the top planes of
        // classes 1 and up where they hold zeros only: those stored as
        // frames of zeros are then not even written, others are checked.
        let blocks = blocks_path(dtype, layout);
        let (offsets, counts, skipped) =
            decompress_planes_by_frames(dtype, layout, rows, chunk, planes, kind, blocks)?;
        let top_zero = blocks && (skipped || top_zero(dtype.width(), &offsets, &counts, planes));
        let t1 = std::time::Instant::now();
        let (o, c) = (&offsets[..], &counts[..]);
        let r = match dtype.width() {
            2 => gather::<2>(dtype, layout, base, rows, o, c, planes, out, nt, top_zero),
            4 => gather::<4>(dtype, layout, base, rows, o, c, planes, out, nt, top_zero),
            _ => gather::<8>(dtype, layout, base, rows, o, c, planes, out, nt, top_zero),
        };
        // Fenced on every way out: a chunk refused after some of its lines
        // were stored past the cache too.
        if nt {
            gather_avx512::fence();
        }
        r?;
        Ok((t1 - t0, t1.elapsed()))
    })
}

/// Whether [`gather`] rebuilds a chunk of `dtype` in `layout` with its
/// AVX-512 loop over whole q4 blocks: rows of whole q4 groups of 64 BF16,
/// F16 or F32 values (every weight matrix of the usual shapes), one loop
/// over all their blocks, which rebuilds what the group-by-group path
/// would (a block with a non-finite scale is skipped and flagged: the
/// chunk is refused either way).
fn blocks_path(dtype: FloatDtype, layout: &BaseLayout) -> bool {
    layout.codec == BaseCodec::Q4
        && layout.group == 64
        && layout.cols.is_multiple_of(64)
        && matches!(dtype, FloatDtype::BF16 | FloatDtype::F16 | FloatDtype::F32)
        && gather_avx512::available()
}

/// Byte at `at` of the plane buffer.
///
/// # Safety
///
/// `at < planes.len()`. Holds for every read of [`gather`]: a class's
/// cursor starts at its first plane's offset and advances once per element
/// of the class, and [`gather`] checks before each read that the cursor is
/// below `offsets[class * W] + counts[class]`, the end of the class's first
/// plane; each further plane of the class is `counts[class]` bytes further
/// on, and the planes hold every class's `W` planes.
#[inline(always)]
unsafe fn plane_byte(planes: &[u8], at: usize) -> u8 {
    debug_assert!(at < planes.len());
    *planes.get_unchecked(at)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gather<const W: usize>(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    rows: usize,
    offsets: &[usize],
    counts: &[usize],
    planes: &[u8],
    out: &mut [u8],
    nt: bool,
    top_zero: bool,
) -> Result<(), CodecError> {
    let bits = (W * 8) as u32;
    let m = mask(bits);
    let rb = layout.row_bytes();
    // Absolute read position of each class's first plane; its plane `p` is
    // `p * counts[class]` further on (planes of a class are consecutive).
    // `lim`: the end of the class's first plane. A class with fewer bytes
    // than the base has elements of it stops the gather (`short`) before
    // any read past its planes.
    let mut cur = [0usize; 9];
    let mut stride = [0usize; 9];
    let mut lim = [0usize; 9];
    for c in 0..counts.len() {
        cur[c] = offsets[c * W];
        stride[c] = counts[c];
        lim[c] = cur[c] + counts[c];
    }
    assert!(
        (0..counts.len()).all(|c| offsets[c * W] + W * counts[c] + PLANE_SLACK <= planes.len()),
        "the planes hold every class, and the slack"
    );
    // `short`: the first class found to run out (its planes hold fewer
    // elements than the base has of it).
    let mut short: Option<usize> = None;
    let (mut bad_pad, mut bad_scale, mut bad_q8) = (false, false, false);
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn one<const W: usize>(
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        short: &mut Option<usize>,
        planes: &[u8],
        class: usize,
        pred_key: u64,
        m: u64,
        dst: &mut [u8],
    ) {
        let at = cur[class];
        if at >= lim[class] {
            short.get_or_insert(class);
            return;
        }
        cur[class] = at + 1;
        let mut z = 0u64;
        for p in 0..W {
            // SAFETY: see `plane_byte`.
            z |= (unsafe { plane_byte(planes, at + p * stride[class]) } as u64) << (8 * p);
        }
        let orig = unkey_w::<W>(pred_key.wrapping_add(unzigzag(z, (W * 8) as u32)) & m);
        dst[..W].copy_from_slice(&orig.to_le_bytes()[..W]);
    }
    let _ = bits;
    // Groups of 64 q4 codes of a 2-byte type go 64 elements at a time
    // through AVX-512 (byte expand-loads from each class's planes).
    let wide = (W == 2 || W == 4) && layout.codec == BaseCodec::Q4 && gather_avx512::available();
    let blocks = blocks_path(dtype, layout);
    debug_assert!(wide || !blocks);
    debug_assert!(
        blocks || !top_zero,
        "top planes skipped only by the block loop"
    );
    if blocks {
        let (base, out) = (&base[..rows * rb], &mut out[..rows * layout.cols * W]);
        // SAFETY: the features are present; `base` is whole 34-byte blocks
        // and `out` 64 values per block; the planes have their slack
        // (asserted above).
        bad_scale = unsafe {
            match gather_avx512::Half::of(dtype) {
                Some(half) => gather_avx512::blocks64_w2(
                    half, base, &mut cur, &stride, &lim, planes, out, nt, top_zero,
                ),
                None => gather_avx512::blocks64_f32(
                    base, &mut cur, &stride, &lim, planes, out, nt, top_zero,
                ),
            }
        };
    }
    for (row, orow) in base
        .chunks_exact(rb)
        .take(if blocks { 0 } else { rows })
        .zip(out.chunks_exact_mut(layout.cols * W))
    {
        layout.for_each_group(|col, len, off| {
            // A non-finite scale would make predictions depend on the
            // processor (0 × Inf is a NaN of unspecified sign).
            bad_scale |= row[off + 1] & 0x7C == 0x7C;
            if short.is_some() {
                return;
            }
            let d = block_scale(&row[off..]);
            let payload = &row[off + 2..off + layout.block_bytes(len)];
            let vals = &mut orow[col * W..(col + len) * W];
            match layout.codec {
                BaseCodec::Q4 => {
                    if wide && len == 64 && d.is_finite() {
                        // SAFETY: as below; the keys are computed in
                        // registers as `q4_key_table` computes them.
                        let (c, s, l) = (&mut cur, &stride, &lim);
                        match dtype {
                            FloatDtype::BF16 => {
                                unsafe {
                                    gather_avx512::group64_bf16(
                                        d.to_f32(),
                                        payload,
                                        c,
                                        s,
                                        l,
                                        planes,
                                        vals,
                                    )
                                }
                                return;
                            }
                            FloatDtype::F32 => {
                                unsafe {
                                    gather_avx512::group64_f32(
                                        d.to_f32(),
                                        payload,
                                        c,
                                        s,
                                        l,
                                        planes,
                                        vals,
                                    )
                                }
                                return;
                            }
                            _ => {}
                        }
                    }
                    let table = q4_key_table::<W>(dtype, d);
                    if wide && len == 64 {
                        // SAFETY: the features are present (`available`);
                        // `payload` is 32 bytes and `vals` 64 × W; the planes
                        // have 64 bytes of slack past the last class (asserted
                        // above), so reads from `min(cur, lim)` stay inside.
                        if W == 2 {
                            let keys: [u16; 16] = std::array::from_fn(|k| table[k] as u16);
                            unsafe {
                                gather_avx512::group64_w2(
                                    &keys, payload, &mut cur, &stride, &lim, planes, vals,
                                )
                            }
                        } else {
                            let keys: [u32; 16] = std::array::from_fn(|k| table[k] as u32);
                            unsafe {
                                gather_avx512::group64_w4(
                                    &keys, payload, &mut cur, &stride, &lim, planes, vals,
                                )
                            }
                        }
                        return;
                    }
                    let mut pairs = vals.chunks_exact_mut(2 * W);
                    for (pair, &b) in (&mut pairs).zip(payload) {
                        let (lo, hi) = ((b & 15) as usize, (b >> 4) as usize);
                        let (a, z) = pair.split_at_mut(W);
                        let s = &mut short;
                        one::<W>(
                            &mut cur,
                            &stride,
                            &lim,
                            s,
                            planes,
                            Q4_CLASS[lo],
                            table[lo],
                            m,
                            a,
                        );
                        one::<W>(
                            &mut cur,
                            &stride,
                            &lim,
                            s,
                            planes,
                            Q4_CLASS[hi],
                            table[hi],
                            m,
                            z,
                        );
                    }
                    let tail = pairs.into_remainder();
                    if !tail.is_empty() {
                        let b = payload[len / 2];
                        bad_pad |= b >> 4 != 0;
                        let lo = (b & 15) as usize;
                        let s = &mut short;
                        one::<W>(
                            &mut cur,
                            &stride,
                            &lim,
                            s,
                            planes,
                            Q4_CLASS[lo],
                            table[lo],
                            m,
                            tail,
                        );
                    }
                }
                BaseCodec::Q8 => {
                    for (v, &b) in vals.chunks_exact_mut(W).zip(payload) {
                        bad_q8 |= b == 0x80;
                        let q = b as i8 as i32;
                        let k = key_w::<W>(dtype.predict_bits(q, d));
                        let c = class_of(BaseCodec::Q8, q);
                        one::<W>(&mut cur, &stride, &lim, &mut short, planes, c, k, m, v);
                    }
                }
            }
        });
    }
    // The checks of `count_classes`, in the same order.
    if bad_pad {
        return Err(CodecError::Corrupt(
            "non-zero padding nibble in a q4 base".into(),
        ));
    }
    if bad_scale {
        return Err(CodecError::Corrupt(
            "non-finite group scale in the base".into(),
        ));
    }
    if bad_q8 {
        return Err(CodecError::Corrupt(
            "q8 code -128 in the base (codes are -127..=127)".into(),
        ));
    }
    // The streams' counts add up to the base's elements, so a class whose
    // cursor did not end exactly at its streams' end means one with more
    // elements in the base than in its streams.
    let over = (0..counts.len()).find(|&c| cur[c] > lim[c]);
    if let Some(c) = short.or(over) {
        return Err(CodecError::Corrupt(format!(
            "the base has more elements of class {c} than its streams hold ({})",
            counts[c]
        )));
    }
    if let Some(c) = (0..counts.len()).find(|&c| cur[c] != lim[c]) {
        // Unreachable while the counts add up; kept as the rule itself.
        return Err(CodecError::Corrupt(format!(
            "the base has fewer elements of class {c} than its streams hold ({})",
            counts[c]
        )));
    }
    Ok(())
}

/// The base's own values (`base` fidelity): each element's prediction in
/// the tensor's dtype, as little-endian bytes into `out` (whole rows). The
/// same predictions the residual is measured from; a non-finite scale is
/// refused for the same reason as in [`decode`]. Fast path of
/// [`base_values_reference`] (a table of the 16 predictions per q4 group;
/// stores specialized by width), bit-identical to it.
pub fn base_values(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    base_values_with(dtype, layout, base, out, Stores::Cached)
}

/// [`base_values`], storing as `stores` says.
pub fn base_values_with(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    out: &mut [u8],
    stores: Stores,
) -> Result<(), CodecError> {
    let nt = stores == Stores::PastCache;
    match dtype.width() {
        2 => base_values_w::<2>(dtype, layout, base, out, nt),
        4 => base_values_w::<4>(dtype, layout, base, out, nt),
        _ => base_values_w::<8>(dtype, layout, base, out, nt),
    }
}

fn base_values_w<const W: usize>(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    out: &mut [u8],
    nt: bool,
) -> Result<(), CodecError> {
    let rows = check_shapes(dtype, layout, out.len(), base.len())?;
    let rb = layout.row_bytes();
    let ob = layout.cols * W;
    let mut lut = [[0u8; W]; 16];
    let simd = W == 2 && q4_simd::available();
    // Whole q4 groups of 64 BF16 or F32 values through a table in an
    // AVX-512 register.
    let wide = matches!(
        (W, dtype),
        (2, FloatDtype::BF16) | (2, FloatDtype::F16) | (4, FloatDtype::F32)
    ) && layout.codec == BaseCodec::Q4
        && gather_avx512::available();
    // The checks of `count_classes`, made on the way (the output is
    // garbage when they fail, and the caller gets the error).
    let (mut bad_pad, mut bad_scale, mut bad_q8) = (false, false, false);
    for r in 0..rows {
        let row = &base[r * rb..(r + 1) * rb];
        let orow = &mut out[r * ob..(r + 1) * ob];
        layout.for_each_group(|col, len, off| {
            let scale = block_scale(&row[off..]);
            let payload = &row[off + 2..off + layout.block_bytes(len)];
            let o = &mut orow[col * W..(col + len) * W];
            bad_scale |= row[off + 1] & 0x7C == 0x7C;
            match layout.codec {
                BaseCodec::Q4 => bad_pad |= len % 2 == 1 && payload[len / 2] >> 4 != 0,
                BaseCodec::Q8 => bad_q8 |= payload.contains(&0x80),
            }
            // The scale widened once per group (what `predict_bits` does per call).
            let df = scale.to_f32();
            if wide && len == 64 {
                // SAFETY: the features are present; `payload` holds the
                // group's 32 code bytes and `o` its 64 values.
                unsafe {
                    match gather_avx512::Half::of(dtype) {
                        Some(half) => gather_avx512::base64_w2(half, df, payload, o, nt),
                        None => gather_avx512::base64_f32(df, payload, o, nt),
                    }
                };
                return;
            }
            let bits = |q: i32| -> [u8; W] {
                let v = match dtype {
                    FloatDtype::BF16 => crate::float::bf16_bits_rne(q as f32 * df) as u64,
                    FloatDtype::F32 => (q as f32 * df).to_bits() as u64,
                    _ => dtype.predict_bits(q, scale),
                };
                v.to_le_bytes()[..W].try_into().expect("width")
            };
            match layout.codec {
                BaseCodec::Q4 => {
                    // Whole 16-byte blocks of codes through SIMD table lookups
                    // (2-byte types), the rest one byte at a time.
                    let mut done = 0;
                    if simd && dtype == FloatDtype::BF16 {
                        // The table as two byte planes, in a loop the compiler
                        // vectorizes: round to nearest even without the NaN
                        // case of `bf16_bits_rne` (the scale is finite, or the
                        // call fails).
                        let (mut lo, mut hi) = ([0u8; 16], [0u8; 16]);
                        for k in 0..16 {
                            let b = (Q4_VALUES[k] * df).to_bits();
                            let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
                            lo[k] = r as u8;
                            hi[k] = (r >> 8) as u8;
                            lut[k][0] = lo[k];
                            lut[k][1] = hi[k];
                        }
                        done = q4_simd::expand_w2(&lo, &hi, &payload[..len / 2], o);
                    } else {
                        for (k, v) in lut.iter_mut().enumerate() {
                            *v = bits(k as i32 - 8);
                        }
                        if simd {
                            let lo: [u8; 16] = std::array::from_fn(|k| lut[k][0]);
                            let hi: [u8; 16] = std::array::from_fn(|k| lut[k][1]);
                            done = q4_simd::expand_w2(&lo, &hi, &payload[..len / 2], o);
                        }
                    }
                    let mut pairs = o[done * 2 * W..].chunks_exact_mut(2 * W);
                    for (pair, &b) in (&mut pairs).zip(&payload[done..]) {
                        pair[..W].copy_from_slice(&lut[(b & 0x0F) as usize]);
                        pair[W..].copy_from_slice(&lut[(b >> 4) as usize]);
                    }
                    let tail = pairs.into_remainder();
                    if !tail.is_empty() {
                        tail.copy_from_slice(&lut[(payload[len / 2] & 0x0F) as usize]);
                    }
                }
                BaseCodec::Q8 => {
                    for (v, &q) in o.chunks_exact_mut(W).zip(payload) {
                        v.copy_from_slice(&bits(q as i8 as i32));
                    }
                }
            }
        });
    }
    if nt {
        gather_avx512::fence();
    }
    if bad_pad {
        return Err(CodecError::Corrupt(
            "non-zero padding nibble in a q4 base".into(),
        ));
    }
    if bad_scale {
        return Err(CodecError::Corrupt(
            "non-finite group scale in the base".into(),
        ));
    }
    if bad_q8 {
        return Err(CodecError::Corrupt(
            "q8 code -128 in the base (codes are -127..=127)".into(),
        ));
    }
    Ok(())
}

/// The exact residual's gather for one q4 group of 64 elements of a 2- or
/// 4-byte type, 64 elements at a time (AVX-512 with VBMI and VBMI2 on x86-64;
/// elsewhere never used). Output identical to the scalar gather, which the
/// tests compare with the reference decoder.
mod gather_avx512 {
    /// Whether [`group64_w2`] may be called on this machine.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vbmi")
                && std::is_x86_feature_detected!("avx512vbmi2")
                // Every processor with these has it; without it in the
                // functions' features a cursor's count is a dozen
                // instructions instead of one.
                && std::is_x86_feature_detected!("popcnt")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Rebuilds 64 elements: element `e`'s code is nibble `e` of `payload`
    /// (low nibble first), its class `Q4_CLASS[code]`, its residual the next
    /// byte of its class's plane 0 (at `cur[class]`) and plane 1 (at
    /// `cur[class] + stride[class]`), its predicted key `keys[code]`.
    ///
    /// A cursor may end past its `lim` (see [`codes_and_planes`]): the
    /// caller must then refuse the output.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `payload` holds 32 bytes and `out` 128;
    /// for every class, its last plane (plane 1 for two-byte values, at
    /// `lim[class] + stride[class]`, or plane 3 for four-byte ones) ends at
    /// least 64 bytes before the end of `planes`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn group64_w2(
        keys: &[u16; 16],
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let mut key_tab = [0u16; 32];
        key_tab[..16].copy_from_slice(keys);
        let key_tab = _mm512_loadu_si512(key_tab.as_ptr() as *const _);
        group64_w2_tab::<false>(key_tab, payload, cur, stride, lim, planes, out, false)
    }

    /// [`group64_w2`] for BF16 values, the 16 predicted keys computed in
    /// registers from the group's scale `df` (finite): the BF16 rounding
    /// (to nearest, ties to even) of `q × df` and its order key, as
    /// `q4_key_table` computes them.
    ///
    /// # Safety
    ///
    /// As [`group64_w2`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn group64_bf16(
        df: f32,
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
    ) {
        group64_w2_tab::<false>(bf16_keys(df), payload, cur, stride, lim, planes, out, false)
    }

    /// The order keys of the 16 BF16 predictions `q × df` (`df` finite,
    /// rounded to nearest, ties to even), as `q4_key_table` computes them,
    /// in the low 16 words (the rest 0).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    pub(super) unsafe fn bf16_keys(df: f32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let r = bf16_values32(df);
        // The order key of the 16-bit pattern: flip every bit of a
        // negative one, the sign bit of a positive one.
        let neg = _mm512_and_si512(_mm512_srli_epi32(r, 15), _mm512_set1_epi32(1));
        let flip = _mm512_or_si512(
            _mm512_mullo_epi32(neg, _mm512_set1_epi32(0xFFFF)),
            _mm512_set1_epi32(0x8000),
        );
        let k = _mm512_xor_si512(r, flip);
        _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(k))
    }

    /// The 16 BF16 predictions `q × df` (`df` finite, rounded to nearest,
    /// ties to even: `bf16_bits_rne` without its NaN case), one per 32-bit
    /// lane.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn bf16_values32(df: f32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let v = _mm512_mul_ps(
            _mm512_loadu_ps(super::Q4_VALUES.as_ptr()),
            _mm512_set1_ps(df),
        );
        let b = _mm512_castps_si512(v);
        // (b + 0x7FFF + ((b >> 16) & 1)) >> 16, in 32-bit lanes.
        _mm512_srli_epi32(
            _mm512_add_epi32(
                _mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
            ),
            16,
        )
    }

    /// The order keys of the 16 F32 predictions `q × df` (`df` finite), as
    /// `q4_key_table` computes them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    pub(super) unsafe fn f32_keys(df: f32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let b = _mm512_castps_si512(_mm512_mul_ps(
            _mm512_loadu_ps(super::Q4_VALUES.as_ptr()),
            _mm512_set1_ps(df),
        ));
        // Flip every bit of a negative pattern, the sign bit of a positive one.
        let flip = _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(i32::MIN));
        _mm512_xor_si512(b, flip)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group64_w2_tab<const TOP_ZERO: bool>(
        key_tab: std::arch::x86_64::__m512i,
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
        past_cache: bool,
    ) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && out.len() >= 128,
            "a group of 64 codes"
        );
        let (codes, [z0, z1]) = codes_and_planes::<2, TOP_ZERO>(payload, cur, stride, lim, planes);
        for half in 0..2 {
            let (lo, hi, idx) = if half == 0 {
                (
                    _mm512_castsi512_si256(z0),
                    _mm512_castsi512_si256(z1),
                    _mm512_castsi512_si256(codes),
                )
            } else {
                (
                    _mm512_extracti64x4_epi64(z0, 1),
                    _mm512_extracti64x4_epi64(z1, 1),
                    _mm512_extracti64x4_epi64(codes, 1),
                )
            };
            let z = _mm512_or_si512(
                _mm512_cvtepu8_epi16(lo),
                _mm512_slli_epi16(_mm512_cvtepu8_epi16(hi), 8),
            );
            // Unzigzag, add the prediction's key, and invert the key.
            let r = _mm512_xor_si512(
                _mm512_srli_epi16(z, 1),
                _mm512_sub_epi16(
                    _mm512_setzero_si512(),
                    _mm512_and_si512(z, _mm512_set1_epi16(1)),
                ),
            );
            let pred = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), key_tab);
            let k = _mm512_add_epi16(pred, r);
            let flip = _mm512_or_si512(
                _mm512_xor_si512(_mm512_srai_epi16(k, 15), _mm512_set1_epi16(-1)),
                _mm512_set1_epi16(i16::MIN),
            );
            let v = _mm512_xor_si512(k, flip);
            store_line(out.as_mut_ptr().add(64 * half), v, past_cache);
        }
    }

    /// The group's 64 codes in element order (payload byte i holds elements
    /// 2i, low nibble, and 2i + 1, high nibble), and each element's residual
    /// bytes from the `P` planes of its class, plane `p` in vector `p`; the
    /// class cursors advance past them. A class's bytes are read from
    /// `min(cur, lim)`, so a cursor past its class's planes (a base with more
    /// elements of the class than its streams) reads at most 64 bytes past
    /// the end of the class's last plane.
    ///
    /// # Safety
    ///
    /// As for [`group64_w2`], with `P` plane positions per class.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn codes_and_planes<const P: usize, const TOP_ZERO: bool>(
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
    ) -> (std::arch::x86_64::__m512i, [std::arch::x86_64::__m512i; P]) {
        use std::arch::x86_64::*;
        let (codes, classes) = codes_and_classes(payload);
        // One register per plane (an array indexed in the loop would live
        // on the stack); planes beyond `P` are never touched.
        let (mut z0, mut z1, mut z2, mut z3) = (
            _mm512_setzero_si512(),
            _mm512_setzero_si512(),
            _mm512_setzero_si512(),
            _mm512_setzero_si512(),
        );
        for c in 0..9 {
            // An empty mask loads nothing (and cannot fault).
            let m = _mm512_cmpeq_epi8_mask(classes, _mm512_set1_epi8(c as i8));
            // Never from past `lim[c]`: a cursor that ran past it reads the
            // slack after the planes, and the caller refuses the chunk.
            let at = planes.as_ptr().add(cur[c].min(lim[c])) as *const i8;
            let s = stride[c];
            // With `TOP_ZERO`, the top plane of every class but 0 holds
            // zeros only: its lanes keep the zeros they start with.
            let top = !(TOP_ZERO && c > 0);
            z0 = _mm512_mask_expandloadu_epi8(z0, m, at);
            if P == 2 && top || P == 4 {
                z1 = _mm512_mask_expandloadu_epi8(z1, m, at.add(s));
            }
            if P == 4 {
                z2 = _mm512_mask_expandloadu_epi8(z2, m, at.add(2 * s));
                if top {
                    z3 = _mm512_mask_expandloadu_epi8(z3, m, at.add(3 * s));
                }
            }
            cur[c] += m.count_ones() as usize;
        }
        let all = [z0, z1, z2, z3];
        (codes, std::array::from_fn(|p| all[p]))
    }

    /// The encoder's scatter for one q4 group of 64 two-byte elements, the
    /// inverse of [`group64_w2`]: each element's zigzagged residual against
    /// `keys[code]`, its low byte appended to its class's plane 0 (at
    /// `cur[class]`) and its high byte to plane 1 (`stride[class]` further).
    /// Whole vectors are stored at the cursors: up to 64 bytes past a
    /// cursor are overwritten with garbage.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `payload` holds 32 bytes and `vals` 128; each
    /// class's two planes have room for its remaining elements plus 64 bytes
    /// at their cursors, and nothing there needs keeping.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter64_w2(
        keys: &[u16; 16],
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let mut key_tab = [0u16; 32];
        key_tab[..16].copy_from_slice(keys);
        let key_tab = _mm512_loadu_si512(key_tab.as_ptr() as *const _);
        scatter64_w2_tab(key_tab, payload, vals, cur, stride, planes)
    }

    /// [`scatter64_w2`] for BF16 values, the keys computed in registers
    /// from the group's finite scale `df` (as the decoder's
    /// [`group64_bf16`]).
    ///
    /// # Safety
    ///
    /// As [`scatter64_w2`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter64_bf16(
        df: f32,
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        scatter64_w2_tab(bf16_keys(df), payload, vals, cur, stride, planes)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn scatter64_w2_tab(
        key_tab: std::arch::x86_64::__m512i,
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && vals.len() >= 128,
            "a group of 64 codes"
        );
        let (codes, classes) = codes_and_classes(payload);
        let mut lo = [_mm256_setzero_si256(); 2];
        let mut hi = [_mm256_setzero_si256(); 2];
        for half in 0..2 {
            let x = _mm512_loadu_si512(vals.as_ptr().add(64 * half) as *const _);
            let idx = if half == 0 {
                _mm512_castsi512_si256(codes)
            } else {
                _mm512_extracti64x4_epi64(codes, 1)
            };
            let pred = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), key_tab);
            // key(x) = x ^ (sign ? 0xFFFF : 0x8000); r = key − pred; zigzag.
            let k = _mm512_xor_si512(
                x,
                _mm512_or_si512(_mm512_srai_epi16(x, 15), _mm512_set1_epi16(i16::MIN)),
            );
            let r = _mm512_sub_epi16(k, pred);
            let z = _mm512_xor_si512(_mm512_slli_epi16(r, 1), _mm512_srai_epi16(r, 15));
            lo[half] = _mm512_cvtepi16_epi8(z);
            hi[half] = _mm512_cvtepi16_epi8(_mm512_srli_epi16(z, 8));
        }
        let join = |v: [__m256i; 2]| _mm512_inserti64x4(_mm512_castsi256_si512(v[0]), v[1], 1);
        scatter_planes(classes, &[join(lo), join(hi)], cur, stride, planes);
    }

    /// [`scatter64_w2`] for 4-byte elements: four planes, 32-bit keys;
    /// `vals` holds 256 bytes.
    ///
    /// # Safety
    ///
    /// As for [`scatter64_w2`], with four planes per class.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter64_w4(
        keys: &[u32; 16],
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let key_tab = _mm512_loadu_si512(keys.as_ptr() as *const _);
        scatter64_w4_tab(key_tab, payload, vals, cur, stride, planes)
    }

    /// [`scatter64_w4`] for F32 values, the keys computed in registers
    /// from the group's finite scale `df` (as the decoder's
    /// [`group64_f32`]).
    ///
    /// # Safety
    ///
    /// As [`scatter64_w4`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter64_f32(
        df: f32,
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        scatter64_w4_tab(f32_keys(df), payload, vals, cur, stride, planes)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn scatter64_w4_tab(
        key_tab: std::arch::x86_64::__m512i,
        payload: &[u8],
        vals: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && vals.len() >= 256,
            "a group of 64 codes"
        );
        let (codes, classes) = codes_and_classes(payload);
        let mut bytes = [[_mm_setzero_si128(); 4]; 4]; // [plane][quarter]
        #[allow(clippy::needless_range_loop)] // `q` picks the quarter of every plane
        for q in 0..4 {
            let x = _mm512_loadu_si512(vals.as_ptr().add(64 * q) as *const _);
            let idx = _mm512_cvtepu8_epi32(match q {
                0 => _mm512_extracti32x4_epi32(codes, 0),
                1 => _mm512_extracti32x4_epi32(codes, 1),
                2 => _mm512_extracti32x4_epi32(codes, 2),
                _ => _mm512_extracti32x4_epi32(codes, 3),
            });
            let pred = _mm512_permutexvar_epi32(idx, key_tab);
            let k = _mm512_xor_si512(
                x,
                _mm512_or_si512(_mm512_srai_epi32(x, 31), _mm512_set1_epi32(i32::MIN)),
            );
            let r = _mm512_sub_epi32(k, pred);
            let z = _mm512_xor_si512(_mm512_slli_epi32(r, 1), _mm512_srai_epi32(r, 31));
            bytes[0][q] = _mm512_cvtepi32_epi8(z);
            bytes[1][q] = _mm512_cvtepi32_epi8(_mm512_srli_epi32(z, 8));
            bytes[2][q] = _mm512_cvtepi32_epi8(_mm512_srli_epi32(z, 16));
            bytes[3][q] = _mm512_cvtepi32_epi8(_mm512_srli_epi32(z, 24));
        }
        let join = |v: [__m128i; 4]| {
            let a = _mm512_inserti32x4(_mm512_castsi128_si512(v[0]), v[1], 1);
            let a = _mm512_inserti32x4(a, v[2], 2);
            _mm512_inserti32x4(a, v[3], 3)
        };
        let planes_v = [
            join(bytes[0]),
            join(bytes[1]),
            join(bytes[2]),
            join(bytes[3]),
        ];
        scatter_planes(classes, &planes_v, cur, stride, planes);
    }

    /// The group's 64 codes in element order (payload byte i holds elements
    /// 2i, low nibble, and 2i + 1, high nibble)
    /// and their classes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn codes_and_classes(
        payload: &[u8],
    ) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        use std::arch::x86_64::*;
        let mut class_tab = [0u8; 64];
        class_tab[..16].copy_from_slice(&super::Q4_CLASS_U8);
        let class_tab = _mm512_loadu_si512(class_tab.as_ptr() as *const _);
        let p = _mm512_cvtepu8_epi16(_mm256_loadu_si256(payload.as_ptr() as *const __m256i));
        let codes = _mm512_or_si512(
            _mm512_and_si512(p, _mm512_set1_epi16(0x000F)),
            _mm512_and_si512(_mm512_slli_epi16(p, 4), _mm512_set1_epi16(0x0F00)),
        );
        (codes, _mm512_permutexvar_epi8(codes, class_tab))
    }

    /// Appends each plane vector's bytes of class `c` to that class's plane
    /// at its cursor (compressed, then stored whole), for the 9 classes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn scatter_planes<const P: usize>(
        classes: std::arch::x86_64::__m512i,
        v: &[std::arch::x86_64::__m512i; P],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let base = planes.as_mut_ptr();
        for c in 0..9 {
            let m = _mm512_cmpeq_epi8_mask(classes, _mm512_set1_epi8(c as i8));
            if m == 0 {
                continue;
            }
            let at = base.add(cur[c]);
            for (p, &vp) in v.iter().enumerate() {
                _mm512_storeu_si512(
                    at.add(p * stride[c]) as *mut _,
                    _mm512_maskz_compress_epi8(m, vp),
                );
            }
            cur[c] += m.count_ones() as usize;
        }
    }

    /// [`group64_w2`] for 4-byte values: four planes, 32-bit keys; `out`
    /// holds 256 bytes.
    ///
    /// # Safety
    ///
    /// As for [`group64_w2`], with four plane positions per class
    /// (`cur[class] + p * stride[class]`, `p` in 0..4).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn group64_w4(
        keys: &[u32; 16],
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let key_tab = _mm512_loadu_si512(keys.as_ptr() as *const _);
        group64_w4_tab::<false>(key_tab, payload, cur, stride, lim, planes, out, false)
    }

    /// [`group64_w4`] for F32 values, the 16 predicted keys computed in
    /// registers from the group's scale `df` (finite): the bits of
    /// `q × df` and their order key, as `q4_key_table` computes them.
    ///
    /// # Safety
    ///
    /// As [`group64_w4`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn group64_f32(
        df: f32,
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
    ) {
        group64_w4_tab::<false>(f32_keys(df), payload, cur, stride, lim, planes, out, false)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group64_w4_tab<const TOP_ZERO: bool>(
        key_tab: std::arch::x86_64::__m512i,
        payload: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
        past_cache: bool,
    ) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && out.len() >= 256,
            "a group of 64 codes"
        );
        let (codes, z) = codes_and_planes::<4, TOP_ZERO>(payload, cur, stride, lim, planes);
        // Sixteen elements at a time: the four planes' bytes into 32-bit
        // words, then as for two-byte values.
        macro_rules! quarter {
            ($q:literal) => {{
                let w = |v: __m512i| _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, $q));
                let zz = _mm512_or_si512(
                    _mm512_or_si512(w(z[0]), _mm512_slli_epi32(w(z[1]), 8)),
                    _mm512_or_si512(
                        _mm512_slli_epi32(w(z[2]), 16),
                        _mm512_slli_epi32(w(z[3]), 24),
                    ),
                );
                let r = _mm512_xor_si512(
                    _mm512_srli_epi32(zz, 1),
                    _mm512_sub_epi32(
                        _mm512_setzero_si512(),
                        _mm512_and_si512(zz, _mm512_set1_epi32(1)),
                    ),
                );
                let pred = _mm512_permutexvar_epi32(w(codes), key_tab);
                let k = _mm512_add_epi32(pred, r);
                let flip = _mm512_or_si512(
                    _mm512_xor_si512(_mm512_srai_epi32(k, 31), _mm512_set1_epi32(-1)),
                    _mm512_set1_epi32(i32::MIN),
                );
                store_line(
                    out.as_mut_ptr().add(64 * $q),
                    _mm512_xor_si512(k, flip),
                    past_cache,
                );
            }};
        }
        quarter!(0);
        quarter!(1);
        quarter!(2);
        quarter!(3);
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn group64_w4(
        _: &[u32; 16],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn group64_bf16(
        _: f32,
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn group64_f32(
        _: f32,
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    /// [`super::split_nibbles`] of a plane of whole 64-byte blocks, 32
    /// bytes of each output per block, in 16-bit lanes: byte pair
    /// `(p0, p1)` is lane `p0 | p1 << 8`, whose high nibbles are bits 4-7 and
    /// 12-15 and low nibbles bits 0-3 and 8-11.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `plane.len()` is a multiple of 64 and `hi`
    /// and `lo` hold at least half as many bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn split_nibbles64(plane: &[u8], hi: &mut [u8], lo: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(
            plane.len().is_multiple_of(64)
                && hi.len() * 2 >= plane.len()
                && lo.len() * 2 >= plane.len()
        );
        let (n0f, nf0) = (_mm512_set1_epi16(0x0F), _mm512_set1_epi16(0xF0));
        for (i, b) in plane.chunks_exact(64).enumerate() {
            let w = _mm512_loadu_si512(b.as_ptr() as *const _);
            let h = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(w, 4), n0f),
                _mm512_and_si512(_mm512_srli_epi16(w, 8), nf0),
            );
            let l = _mm512_or_si512(
                _mm512_and_si512(w, n0f),
                _mm512_and_si512(_mm512_srli_epi16(w, 4), nf0),
            );
            _mm256_storeu_si256(
                hi.as_mut_ptr().add(32 * i) as *mut _,
                _mm512_cvtepi16_epi8(h),
            );
            _mm256_storeu_si256(
                lo.as_mut_ptr().add(32 * i) as *mut _,
                _mm512_cvtepi16_epi8(l),
            );
        }
    }

    /// Adds the class counts of a base of whole q4 blocks of 64 (a scale,
    /// then 32 bytes of codes) to `counts`; whether any scale is not finite.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `base.len()` is a multiple of 34.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn count_q4_64(base: &[u8], counts: &mut [usize; 9]) -> bool {
        use std::arch::x86_64::*;
        assert!(base.len().is_multiple_of(34));
        // The order of the codes does not matter here: a block's 32 low
        // nibbles and 32 high nibbles make one vector, each nibble's class
        // comes from a 16-entry table in every 128-bit lane (`vpshufb`),
        // and classes 1 to 8 are counted in byte counters (one per lane,
        // at most one a block), summed every 255 blocks; class 0 is what
        // is left.
        let mut tab = [0u8; 64];
        for lane in tab.chunks_exact_mut(16) {
            lane.copy_from_slice(&super::Q4_CLASS_U8);
        }
        let tab = _mm512_loadu_si512(tab.as_ptr() as *const _);
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm512_set1_epi8(1);
        let mut acc = [_mm512_setzero_si512(); 8];
        let flush = |acc: &mut [__m512i; 8], counts: &mut [usize; 9]| {
            for (a, n) in acc.iter_mut().zip(&mut counts[1..]) {
                let sums = _mm512_sad_epu8(*a, _mm512_setzero_si512());
                *n += _mm512_reduce_add_epi64(sums) as usize;
                *a = _mm512_setzero_si512();
            }
        };
        let mut bad = false;
        let blocks = base.len() / 34;
        let before: usize = counts[1..].iter().sum();
        for (i, block) in base.chunks_exact(34).enumerate() {
            bad |= block[1] & 0x7C == 0x7C;
            let p = _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i);
            let lo = _mm256_and_si256(p, nib);
            let hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), nib);
            let codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            let classes = _mm512_shuffle_epi8(tab, codes);
            for (c, a) in acc.iter_mut().enumerate() {
                let m = _mm512_cmpeq_epi8_mask(classes, _mm512_set1_epi8(c as i8 + 1));
                *a = _mm512_mask_add_epi8(*a, m, *a, ones);
            }
            if i % 255 == 254 {
                flush(&mut acc, counts);
            }
        }
        flush(&mut acc, counts);
        let others = counts[1..].iter().sum::<usize>() - before;
        counts[0] += blocks * 64 - others;
        bad
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn count_q4_64(_: &[u8], _: &mut [usize; 9]) -> bool {
        unreachable!("never available off x86-64")
    }

    /// [`super::join_nibbles`] of whole 64-byte blocks of `out`, from 32
    /// bytes of each part per block: in 16-bit lanes, pair `(o0, o1)` is
    /// lane `o0 | o1 << 8`, made of the nibbles of `h` and `l` (bytes
    /// widened to lanes) as `l & 0x000F | h << 4 & 0x00F0 | l << 4 & 0x0F00 |
    /// h << 8 & 0xF000`.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `out.len()` is a multiple of 64 and `hi` and
    /// `lo` hold at least half as many bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn join_nibbles64(hi: &[u8], lo: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(
            out.len().is_multiple_of(64) && hi.len() * 2 >= out.len() && lo.len() * 2 >= out.len()
        );
        let (m0, m1) = (
            _mm512_set1_epi16(0x0F0F),
            _mm512_set1_epi16(0xF0F0u16 as i16),
        );
        for (i, o) in out.chunks_exact_mut(64).enumerate() {
            let h = _mm512_cvtepu8_epi16(_mm256_loadu_si256(hi.as_ptr().add(32 * i) as *const _));
            let l = _mm512_cvtepu8_epi16(_mm256_loadu_si256(lo.as_ptr().add(32 * i) as *const _));
            // l | l << 4 keeps l's low nibble at bits 0-3 and its high one
            // at bits 8-11 under 0x0F0F; h << 4 | h << 8 puts h's low
            // nibble at bits 4-7 and its high one at 12-15 under 0xF0F0.
            let lv = _mm512_and_si512(_mm512_or_si512(l, _mm512_slli_epi16(l, 4)), m0);
            let hv = _mm512_and_si512(
                _mm512_or_si512(_mm512_slli_epi16(h, 4), _mm512_slli_epi16(h, 8)),
                m1,
            );
            _mm512_storeu_si512(o.as_mut_ptr() as *mut _, _mm512_or_si512(lv, hv));
        }
    }

    /// Which 16-bit float a fast path's values are.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Half {
        Bf16,
        F16,
    }

    impl Half {
        pub fn of(dtype: crate::FloatDtype) -> Option<Half> {
            match dtype {
                crate::FloatDtype::BF16 => Some(Half::Bf16),
                crate::FloatDtype::F16 => Some(Half::F16),
                _ => None,
            }
        }
    }

    /// The 16 F16 predictions `q × df` (`df` finite), rounded to nearest
    /// (ties to even; past the largest finite value, infinity) as
    /// `f16::from_f32` rounds them: the low 16 words.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn f16_values(df: f32) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            _mm512_loadu_ps(super::Q4_VALUES.as_ptr()),
            _mm512_set1_ps(df),
        ))
    }

    /// The order keys of the 16 F16 predictions (as [`f16_values`]), as
    /// `q4_key_table` computes them, in the low 16 words (the rest 0).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    pub(super) unsafe fn f16_keys(df: f32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let h = f16_values(df);
        // Flip every bit of a negative pattern, the sign bit of a positive one.
        let flip = _mm256_or_si256(_mm256_srai_epi16(h, 15), _mm256_set1_epi16(i16::MIN));
        _mm512_zextsi256_si512(_mm256_xor_si256(h, flip))
    }

    /// The keys of a block of 16-bit values with scale `df`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn half_keys(half: Half, df: f32) -> std::arch::x86_64::__m512i {
        match half {
            Half::Bf16 => bf16_keys(df),
            Half::F16 => f16_keys(df),
        }
    }

    /// The f32 value of an f16 scale's bits (exact, as `f16::to_f32`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn f16_bits_to_f32(bits: u16) -> f32 {
        use std::arch::x86_64::*;
        _mm_cvtss_f32(_mm512_castps512_ps128(_mm512_cvtph_ps(_mm256_set1_epi16(
            bits as i16,
        ))))
    }

    /// [`group64_bf16`] (or its F16 twin) over whole q4 blocks of 64
    /// (`base`: 34 bytes each, `out`: 128 bytes each), in one loop; a block
    /// whose scale is not finite is skipped (its cursors do not move, its
    /// output is left as it is) and makes the answer `true`. With
    /// `top_zero` (the top plane of every class but 0 holds zeros only, as
    /// [`super::top_planes_zero`] finds), those planes are not read: one
    /// expand-load in two less for most elements.
    ///
    /// # Safety
    ///
    /// As [`group64_w2`] for every block; `base.len()` is a multiple of 34
    /// and `out` holds 128 bytes per block; with `top_zero`, those planes
    /// hold zeros only (else the values come out wrong, never unsafely).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn blocks64_w2(
        half: Half,
        base: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
        past_cache: bool,
        top_zero: bool,
    ) -> bool {
        if top_zero {
            each_block::<128>(base, out, |df, codes, vals| {
                let keys = half_keys(half, df);
                group64_w2_tab::<true>(keys, codes, cur, stride, lim, planes, vals, past_cache)
            })
        } else {
            each_block::<128>(base, out, |df, codes, vals| {
                let keys = half_keys(half, df);
                group64_w2_tab::<false>(keys, codes, cur, stride, lim, planes, vals, past_cache)
            })
        }
    }

    /// [`blocks64_w2`] for F32 values (`out`: 256 bytes per block; the top
    /// plane of `top_zero` is the fourth).
    ///
    /// # Safety
    ///
    /// As [`group64_w4`] for every block; `base.len()` is a multiple of 34
    /// and `out` holds 256 bytes per block; as [`blocks64_w2`] for
    /// `top_zero`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn blocks64_f32(
        base: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        lim: &[usize; 9],
        planes: &[u8],
        out: &mut [u8],
        past_cache: bool,
        top_zero: bool,
    ) -> bool {
        if top_zero {
            each_block::<256>(base, out, |df, codes, vals| {
                let keys = f32_keys(df);
                group64_w4_tab::<true>(keys, codes, cur, stride, lim, planes, vals, past_cache)
            })
        } else {
            each_block::<256>(base, out, |df, codes, vals| {
                let keys = f32_keys(df);
                group64_w4_tab::<false>(keys, codes, cur, stride, lim, planes, vals, past_cache)
            })
        }
    }

    /// The loop of [`blocks64_w2`] and [`blocks64_f32`]: `group(df, codes,
    /// values)` for each 34-byte block of `base` whose scale `df` is finite,
    /// with its `N` bytes of `out`; a block whose scale is not finite is
    /// skipped and makes the answer `true`.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `base.len()` is a multiple of 34 (asserted).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn each_block<const N: usize>(
        base: &[u8],
        out: &mut [u8],
        mut group: impl FnMut(f32, &[u8], &mut [u8]),
    ) -> bool {
        assert!(base.len().is_multiple_of(34) && out.len() >= base.len() / 34 * N);
        let mut bad = false;
        for (block, vals) in base.chunks_exact(34).zip(out.chunks_exact_mut(N)) {
            if block[1] & 0x7C == 0x7C {
                bad = true;
                continue;
            }
            group(
                f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]])),
                &block[2..],
                vals,
            );
        }
        bad
    }

    /// [`scatter64_bf16`] (or its F16 twin) over whole q4 blocks of 64
    /// (`base`: 34 bytes each, every scale finite, else its keys are
    /// meaningless; `src`: 128 bytes each), in one loop.
    ///
    /// # Safety
    ///
    /// As [`scatter64_w2`] for every block; `base.len()` is a multiple of
    /// 34 and `src` holds 128 bytes per block.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter_blocks64_w2(
        half: Half,
        base: &[u8],
        src: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        assert!(base.len().is_multiple_of(34) && src.len() >= base.len() / 34 * 128);
        for (block, vals) in base.chunks_exact(34).zip(src.chunks_exact(128)) {
            let df = f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
            scatter64_w2_tab(half_keys(half, df), &block[2..], vals, cur, stride, planes);
        }
    }

    /// [`scatter_blocks64_w2`] for F32 values (`src`: 256 bytes a block).
    ///
    /// # Safety
    ///
    /// As [`scatter64_w4`] for every block; `base.len()` is a multiple of
    /// 34 and `src` holds 256 bytes per block.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn scatter_blocks64_f32(
        base: &[u8],
        src: &[u8],
        cur: &mut [usize; 9],
        stride: &[usize; 9],
        planes: &mut [u8],
    ) {
        assert!(base.len().is_multiple_of(34) && src.len() >= base.len() / 34 * 256);
        for (block, vals) in base.chunks_exact(34).zip(src.chunks_exact(256)) {
            let df = f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
            scatter64_w4_tab(f32_keys(df), &block[2..], vals, cur, stride, planes);
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter_blocks64_w2(
        _: Half,
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter_blocks64_f32(
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn blocks64_w2(
        _: Half,
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
        _: bool,
        _: bool,
    ) -> bool {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn blocks64_f32(
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
        _: bool,
        _: bool,
    ) -> bool {
        unreachable!("never available off x86-64")
    }

    /// Stores the 64 bytes of `v` at `p`: with `past_cache`, a
    /// non-temporal store when `p` is on a cache line (see
    /// [`super::Stores`]), otherwise a plain one. Callers that may store
    /// past the cache end with [`fence`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_line(p: *mut u8, v: std::arch::x86_64::__m512i, past_cache: bool) {
        use std::arch::x86_64::*;
        if past_cache && (p as usize).is_multiple_of(64) {
            _mm512_stream_si512(p as *mut __m512i, v);
        } else {
            _mm512_storeu_si512(p as *mut _, v);
        }
    }

    /// Orders the non-temporal stores of [`store_line`] before any later
    /// store, so that whoever learns this thread is done sees them.
    pub fn fence() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        }
    }

    /// The base values of one q4 group of 64 F32 elements: each code's
    /// `q × df` (the same IEEE product as the scalar path), 64 at a time
    /// through a 16-entry table in a register.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `payload` holds 32 bytes and `out` 256.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn base64_f32(df: f32, payload: &[u8], out: &mut [u8], past_cache: bool) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && out.len() >= 256,
            "a group of 64 codes"
        );
        let tab = _mm512_mul_ps(
            _mm512_loadu_ps(super::Q4_VALUES.as_ptr()),
            _mm512_set1_ps(df),
        );
        let (codes, _) = codes_and_classes(payload);
        macro_rules! quarter {
            ($q:literal) => {{
                let idx = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, $q));
                store_line(
                    out.as_mut_ptr().add(64 * $q),
                    _mm512_castps_si512(_mm512_permutexvar_ps(idx, tab)),
                    past_cache,
                );
            }};
        }
        quarter!(0);
        quarter!(1);
        quarter!(2);
        quarter!(3);
    }

    /// [`base64_f32`] for BF16 or F16 values (`out`: 128 bytes): each
    /// code's `q × df` rounded as the scalar path rounds it.
    ///
    /// # Safety
    ///
    /// [`available`] is true; `payload` holds 32 bytes and `out` 128.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub unsafe fn base64_w2(half: Half, df: f32, payload: &[u8], out: &mut [u8], past_cache: bool) {
        use std::arch::x86_64::*;
        assert!(
            payload.len() >= 32 && out.len() >= 128,
            "a group of 64 codes"
        );
        let tab = _mm512_zextsi256_si512(match half {
            Half::Bf16 => _mm512_cvtepi32_epi16(bf16_values32(df)),
            Half::F16 => f16_values(df),
        });
        let (codes, _) = codes_and_classes(payload);
        for half in 0..2 {
            let idx = if half == 0 {
                _mm512_castsi512_si256(codes)
            } else {
                _mm512_extracti64x4_epi64(codes, 1)
            };
            store_line(
                out.as_mut_ptr().add(64 * half),
                _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), tab),
                past_cache,
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn base64_w2(_: Half, _: f32, _: &[u8], _: &mut [u8], _: bool) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn base64_f32(_: f32, _: &[u8], _: &mut [u8], _: bool) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn join_nibbles64(_: &[u8], _: &[u8], _: &mut [u8]) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn split_nibbles64(_: &[u8], _: &mut [u8], _: &mut [u8]) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter64_bf16(
        _: f32,
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter64_f32(
        _: f32,
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter64_w2(
        _: &[u16; 16],
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scatter64_w4(
        _: &[u32; 16],
        _: &[u8],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn group64_w2(
        _: &[u16; 16],
        _: &[u8],
        _: &mut [usize; 9],
        _: &[usize; 9],
        _: &[usize; 9],
        _: &[u8],
        _: &mut [u8],
    ) {
        unreachable!("never available off x86-64")
    }
}

/// [`Q4_CLASS`] as bytes, for table lookups.
const Q4_CLASS_U8: [u8; 16] = [8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7];

/// The q4 codes' values, code `k` (a nibble) meaning `k - 8`.
const Q4_VALUES: [f32; 16] = [
    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
];

/// SIMD table lookups for q4 codes of 2-byte values (x86-64 with SSSE3;
/// elsewhere nothing, and the scalar loop does all).
mod q4_simd {
    /// Whether [`expand_w2`] does anything on this machine.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("ssse3")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// For each whole 16-byte block of `payload` (two q4 codes a byte, low
    /// nibble first), writes the 2-byte values `lo[code], hi[code]` of its
    /// 32 codes to `out`; returns the payload bytes done. Call only when
    /// [`available`].
    pub fn expand_w2(lo: &[u8; 16], hi: &[u8; 16], payload: &[u8], out: &mut [u8]) -> usize {
        let blocks = (payload.len() / 16).min(out.len() / 64);
        #[cfg(target_arch = "x86_64")]
        {
            if available() {
                // SAFETY: SSSE3 is present (checked); every load and store
                // is unaligned and within the slices: `blocks` is bounded
                // by both lengths.
                unsafe { expand_ssse3(lo, hi, payload, out, blocks) };
                return blocks * 16;
            }
        }
        let _ = (lo, hi, out, blocks);
        0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "ssse3")]
    unsafe fn expand_ssse3(
        lo: &[u8; 16],
        hi: &[u8; 16],
        payload: &[u8],
        out: &mut [u8],
        blocks: usize,
    ) {
        use std::arch::x86_64::*;
        let tlo = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
        let thi = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        for b in 0..blocks {
            let p = _mm_loadu_si128(payload.as_ptr().add(16 * b) as *const __m128i);
            let even = _mm_and_si128(p, mask);
            let odd = _mm_and_si128(_mm_srli_epi16(p, 4), mask);
            let (el, eh) = (_mm_shuffle_epi8(tlo, even), _mm_shuffle_epi8(thi, even));
            let (ol, oh) = (_mm_shuffle_epi8(tlo, odd), _mm_shuffle_epi8(thi, odd));
            // Values of the even and odd elements as 16-bit words…
            let (e0, e1) = (_mm_unpacklo_epi8(el, eh), _mm_unpackhi_epi8(el, eh));
            let (o0, o1) = (_mm_unpacklo_epi8(ol, oh), _mm_unpackhi_epi8(ol, oh));
            // …interleaved back into element order.
            let dst = out.as_mut_ptr().add(64 * b) as *mut __m128i;
            _mm_storeu_si128(dst, _mm_unpacklo_epi16(e0, o0));
            _mm_storeu_si128(dst.add(1), _mm_unpackhi_epi16(e0, o0));
            _mm_storeu_si128(dst.add(2), _mm_unpacklo_epi16(e1, o1));
            _mm_storeu_si128(dst.add(3), _mm_unpackhi_epi16(e1, o1));
        }
    }
}

/// Reference for [`base_values`]: element by element. The base's own values
/// (`base` fidelity): each element's prediction in
/// the tensor's dtype, as little-endian bytes into `out` (whole rows). The
/// same predictions the residual is measured from; a non-finite scale is
/// refused for the same reason as in [`decode`].
pub fn base_values_reference(
    dtype: FloatDtype,
    layout: &BaseLayout,
    base: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let rows = check_shapes(dtype, layout, out.len(), base.len())?;
    count_classes(layout, base, rows)?; // validates scales, q8 codes and padding nibbles
    let rb = layout.row_bytes();
    for r in 0..rows {
        let row = &base[r * rb..(r + 1) * rb];
        layout.for_each_group(|col, len, off| {
            let d = block_scale(&row[off..]);
            let payload = &row[off + 2..];
            for i in 0..len {
                let q = block_code(layout.codec, payload, i);
                dtype.store_bits(out, r * layout.cols + col + i, dtype.predict_bits(q, d));
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::q4_simd;
    use crate::{base, FloatDtype};
    use tpde_format::{BaseCodec, BaseLayout};

    /// Frame sizes around the edges of the content-size field's widths
    /// and of a block (128 KiB).
    const FRAME_SIZES: [usize; 9] = [
        1,
        255,
        256,
        4096,
        65_791,
        65_792,
        128 << 10,
        (128 << 10) + 1,
        300_000,
    ];

    #[test]
    fn stored_frames_are_zstd_frames_of_their_bytes() {
        use super::{push_stored_frame, zstd_decompress_exact};
        let mut x = 7u64;
        for n in FRAME_SIZES {
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect();
            let mut f = vec![0xEE];
            push_stored_frame(&mut f, &data);
            let f = &f[1..];
            assert_eq!(
                zstd_safe::get_frame_content_size(f).ok(),
                Some(Some(n as u64)),
                "{n} bytes"
            );
            assert_eq!(zstd_safe::find_frame_compressed_size(f), Ok(f.len()), "{n}");
            let mut out = vec![0u8; n];
            zstd_decompress_exact(f, &mut out).expect("decodes");
            assert!(out == data, "{n} bytes");
            // And the library's own decoder agrees.
            assert!(zstd::bulk::decompress(f, n).expect("zstd") == data);
        }
    }

    #[test]
    fn zeros_frames_are_zstd_frames_of_zeros_and_recognized_from_their_headers() {
        use super::{push_zeros_frame, zstd_frame_is_zeros, BLOCK};
        for n in FRAME_SIZES.into_iter().chain([1 << 22]) {
            let mut f = vec![0xEE];
            push_zeros_frame(&mut f, n);
            let f = &f[1..];
            assert!(
                f.len() <= 13 + 4 * n.div_ceil(BLOCK),
                "{n}: {} bytes",
                f.len()
            );
            // The library's own decoder reads it as n zeros.
            let out = zstd::bulk::decompress(f, n).expect("zstd decodes it");
            assert!(out.len() == n && out.iter().all(|&b| b == 0), "{n}");
            assert!(zstd_frame_is_zeros(f, n), "{n}");
            assert!(!zstd_frame_is_zeros(f, n + 1), "{n}: declared size");
            assert!(!zstd_frame_is_zeros(f, n - 1), "{n}: declared size");
            assert!(!zstd_frame_is_zeros(&f[..f.len() - 1], n), "{n}: cut short");
            let longer = [f, &[0u8][..]].concat();
            assert!(!zstd_frame_is_zeros(&longer, n), "{n}: bytes after it");
            // The last block's byte other than 0: n - 1 zeros and a 7 at the end.
            let mut seven = f.to_vec();
            *seven.last_mut().unwrap() = 7;
            assert!(!zstd_frame_is_zeros(&seven, n), "{n}: a run of 7s");
        }
        let mut f = Vec::new();
        push_zeros_frame(&mut f, 1000);
        // A checksum, a dictionary or the reserved bit in the descriptor.
        for bit in [0x04, 0x01, 0x08] {
            let mut g = f.clone();
            g[4] |= bit;
            assert!(!zstd_frame_is_zeros(&g, 1000), "descriptor bit {bit:#x}");
        }
        // A raw block of zeros, and zstd's own frame for zeros: decoded, not
        // recognized.
        let mut raw = Vec::new();
        super::push_stored_frame(&mut raw, &[0u8; 1000]);
        assert!(!zstd_frame_is_zeros(&raw, 1000));
        let own = zstd::bulk::compress(&[0u8; 1000], 3).unwrap();
        assert!(!zstd_frame_is_zeros(&own, 1000));
        for bad in [&[][..], &[0x28, 0xB5, 0x2F, 0xFD][..], &[0u8; 16][..]] {
            assert!(!zstd_frame_is_zeros(bad, 1));
        }
    }

    #[test]
    fn noise_planes_are_stored_and_others_compressed() {
        use super::{plane_plan, Plane};
        let mut x = 3u64;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        assert_eq!(plane_plan(&noise), Plane::Stored);
        // Four bits of noise, two in each nibble: compressible, and its low
        // nibble is not noise given the high one.
        let four: Vec<u8> = noise.iter().map(|b| b & 0x33).collect();
        assert_eq!(plane_plan(&four), Plane::Zstd);
        // Seven bits: the low nibble is noise, the byte compressible.
        let seven: Vec<u8> = noise.iter().map(|b| b & 0x7F).collect();
        assert_eq!(plane_plan(&seven), Plane::Split);
        // A skewed high nibble over a noise low nibble: split.
        let split: Vec<u8> = noise
            .iter()
            .enumerate()
            .map(|(i, b)| (if i % 5 == 0 { 0x30 } else { 0x20 }) | (b & 0x0F))
            .collect();
        assert_eq!(plane_plan(&split), Plane::Split);
    }

    /// The keys the AVX-512 encoder and decoder compute in registers equal
    /// the scalar table's, for every finite f16 scale and every code.
    #[test]
    fn register_keys_match_the_scalar_table_for_every_finite_scale() {
        if !super::gather_avx512::available() {
            eprintln!("not run: this processor lacks the AVX-512 subsets of the fast path");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        for bits in 0..=u16::MAX {
            let d = half::f16::from_bits(bits);
            if !d.is_finite() {
                continue;
            }
            let (mut k16, mut k32) = ([0u16; 32], [0u32; 16]);
            // SAFETY: the features are present (checked above).
            unsafe {
                use std::arch::x86_64::_mm512_storeu_si512;
                _mm512_storeu_si512(
                    k16.as_mut_ptr().cast(),
                    super::gather_avx512::bf16_keys(d.to_f32()),
                );
                _mm512_storeu_si512(
                    k32.as_mut_ptr().cast(),
                    super::gather_avx512::f32_keys(d.to_f32()),
                );
            }
            let mut kh = [0u16; 32];
            // SAFETY: as above.
            unsafe {
                std::arch::x86_64::_mm512_storeu_si512(
                    kh.as_mut_ptr().cast(),
                    super::gather_avx512::f16_keys(d.to_f32()),
                );
            }
            let th = super::q4_key_table::<2>(FloatDtype::F16, d);
            for n in 0..16 {
                assert_eq!(u64::from(kh[n]), th[n], "F16, scale {bits:#06x}, code {n}");
            }
            assert!(kh[16..].iter().all(|&k| k == 0));
            let t16 = super::q4_key_table::<2>(FloatDtype::BF16, d);
            let t32 = super::q4_key_table::<4>(FloatDtype::F32, d);
            for n in 0..16 {
                assert_eq!(
                    u64::from(k16[n]),
                    t16[n],
                    "BF16, scale {bits:#06x}, code {n}"
                );
                assert_eq!(
                    u64::from(k32[n]),
                    t32[n],
                    "F32, scale {bits:#06x}, code {n}"
                );
            }
            assert!(k16[16..].iter().all(|&k| k == 0));
        }
    }

    #[test]
    fn nibble_split_and_join_match_their_scalar_references() {
        use super::{split_nibbles, split_nibbles_scalar};
        let mut x = 5u64;
        for n in [
            0usize, 1, 2, 63, 64, 65, 127, 128, 129, 1000, 4096, 4097, 70_001,
        ] {
            let plane: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect();
            let (mut hi, mut lo) = (vec![0xEE; 3], Vec::new());
            split_nibbles(&plane, &mut hi, &mut lo);
            let half = n.div_ceil(2);
            let (mut hi_ref, mut lo_ref) = (vec![0u8; half], vec![0u8; half]);
            split_nibbles_scalar(&plane, &mut hi_ref, &mut lo_ref);
            assert!(hi == hi_ref && lo == lo_ref, "{n} bytes");
            let mut back = vec![0u8; n];
            super::join_nibbles(&hi, &lo, &mut back);
            assert!(back == plane, "{n} bytes round trip");
            let mut back_ref = vec![0u8; n];
            super::join_nibbles_scalar(&hi, &lo, &mut back_ref);
            assert!(back_ref == plane, "{n} bytes round trip, scalar");
        }
    }

    #[test]
    fn fast_class_counts_match_the_reference() {
        use super::{count_classes, count_classes_fast};
        let mut x = 9u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        };
        for (codec, group, cols, rows) in [
            (BaseCodec::Q4, 64, 256, 7),
            (BaseCodec::Q4, 64, 64, 7),
            // Over 255 blocks: the fast count's byte counters are summed
            // on the way.
            (BaseCodec::Q4, 64, 256, 300),
            (BaseCodec::Q4, 64, 64, 255),
            (BaseCodec::Q4, 64, 100, 7),
            (BaseCodec::Q4, 32, 128, 7),
            (BaseCodec::Q8, 64, 128, 7),
        ] {
            let layout = BaseLayout { codec, group, cols };
            let mut base: Vec<u8> = (0..rows * layout.row_bytes()).map(|_| next()).collect();
            // Finite scales (and, for q8, no code -128; for odd groups a
            // zero padding nibble), so the reference counts.
            for r in 0..rows {
                let row = &mut base[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
                layout.for_each_group(|_, len, off| {
                    row[off + 1] &= 0x3B;
                    if codec == BaseCodec::Q8 {
                        for b in &mut row[off + 2..off + 2 + len] {
                            if *b == 0x80 {
                                *b = 0;
                            }
                        }
                    }
                    if codec == BaseCodec::Q4 && len % 2 == 1 {
                        row[off + layout.block_bytes(len) - 1] &= 0x0F;
                    }
                });
            }
            let want = count_classes(&layout, &base, rows).expect("valid");
            assert_eq!(
                count_classes_fast(&layout, &base, rows).expect("valid"),
                want
            );
            // A non-finite scale is refused by both.
            base[layout.row_bytes() + 1] |= 0x7C;
            assert!(count_classes(&layout, &base, rows).is_err());
            assert!(count_classes_fast(&layout, &base, rows).is_err());
        }
    }

    #[test]
    fn the_class_tables_agree() {
        let wide: Vec<usize> = super::Q4_CLASS_U8.iter().map(|&c| c as usize).collect();
        assert_eq!(wide, super::Q4_CLASS);
        // Which gather the round-trip tests (tests/codecs.rs) exercise here.
        eprintln!(
            "note: AVX-512 gather {}",
            if super::gather_avx512::available() {
                "in use (compared with the reference decoder by the round-trip tests)"
            } else {
                "not available on this machine: the scalar gather is tested alone"
            }
        );
    }

    /// The fast base values refuse exactly the bases the reference refuses,
    /// with the same message.
    #[test]
    fn base_values_refuses_what_the_reference_refuses() {
        for (codec, group, cols) in [
            (BaseCodec::Q4, 64, 128),
            (BaseCodec::Q4, 7, 21),
            (BaseCodec::Q8, 32, 70),
        ] {
            let layout = BaseLayout { codec, group, cols };
            let dtype = FloatDtype::BF16;
            let rows = 3;
            let src: Vec<u8> = (0..rows * cols)
                .flat_map(|i| {
                    half::bf16::from_f32(((i * 7919) % 200) as f32 / 1000.0 - 0.1).to_le_bytes()
                })
                .collect();
            let mut hot = vec![0u8; rows * layout.row_bytes()];
            base::quantize(dtype, &layout, &src, &mut hot);
            let rb = layout.row_bytes();
            let mut cases: Vec<Vec<u8>> = vec![hot.clone()];
            // A non-finite scale in the last row's first group.
            let mut h = hot.clone();
            h[2 * rb + 1] = 0x7C;
            cases.push(h);
            match codec {
                BaseCodec::Q8 => {
                    let mut h = hot.clone();
                    h[rb + 5] = 0x80;
                    cases.push(h);
                }
                BaseCodec::Q4 if group % 2 == 1 => {
                    // The padding nibble of the first (odd-length) group.
                    let mut h = hot.clone();
                    h[layout.block_bytes(group) - 1] |= 0x10;
                    cases.push(h);
                }
                BaseCodec::Q4 => {}
            }
            for (k, h) in cases.iter().enumerate() {
                let mut a = vec![0u8; src.len()];
                let mut b = vec![0u8; src.len()];
                let fast = super::base_values(dtype, &layout, h, &mut a).map_err(|e| e.to_string());
                let slow = super::base_values_reference(dtype, &layout, h, &mut b)
                    .map_err(|e| e.to_string());
                assert_eq!(fast, slow, "{codec:?} group {group} case {k}");
                assert_eq!(fast.is_ok(), k == 0, "{codec:?} group {group} case {k}");
                if k == 0 {
                    assert!(a == b);
                }
            }
        }
    }

    /// The SIMD expansion against the plain one, on every code in every
    /// position and on pseudo-random payloads of every length up to 100.
    #[test]
    fn simd_q4_expansion_matches_the_scalar_one() {
        if !q4_simd::available() {
            eprintln!("note: no SSSE3 on this machine: the SIMD q4 expansion is not used here");
            return;
        }
        let lo: [u8; 16] = std::array::from_fn(|k| (k as u8).wrapping_mul(37) ^ 0x5A);
        let hi: [u8; 16] = std::array::from_fn(|k| (k as u8).wrapping_mul(91) ^ 0xC3);
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        for n in 0..100usize {
            let payload: Vec<u8> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if n == 16 {
                        (i as u8) * 17
                    } else {
                        x as u8
                    }
                })
                .collect();
            let mut out = vec![0xEEu8; n * 4];
            let done = q4_simd::expand_w2(&lo, &hi, &payload, &mut out);
            assert_eq!(done, n / 16 * 16);
            for (i, &b) in payload[..done].iter().enumerate() {
                let (e, o) = ((b & 15) as usize, (b >> 4) as usize);
                assert_eq!(
                    out[4 * i..4 * i + 4],
                    [lo[e], hi[e], lo[o], hi[o]],
                    "n {n} byte {i}"
                );
            }
            assert!(
                out[done * 4..].iter().all(|&b| b == 0xEE),
                "wrote past its blocks"
            );
        }
    }
}
