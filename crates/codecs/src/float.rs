//! Floating-point element types that get the hot/cold decomposition, and the
//! order-preserving integer key on their bit patterns that the exact residual
//! is defined on.

use half::{bf16, f16};

/// A floating-point element type with a hot/cold decomposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    F16,
    BF16,
    F32,
    F64,
}

impl FloatDtype {
    /// Bytes per element.
    pub const fn width(self) -> usize {
        match self {
            FloatDtype::F16 | FloatDtype::BF16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// Bits per element.
    pub const fn bits(self) -> u32 {
        self.width() as u32 * 8
    }

    /// The safetensors / container spelling.
    pub const fn name(self) -> &'static str {
        match self {
            FloatDtype::F16 => "F16",
            FloatDtype::BF16 => "BF16",
            FloatDtype::F32 => "F32",
            FloatDtype::F64 => "F64",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "F16" => FloatDtype::F16,
            "BF16" => FloatDtype::BF16,
            "F32" => FloatDtype::F32,
            "F64" => FloatDtype::F64,
            _ => return None,
        })
    }

    /// Reads element `i` of little-endian `bytes` as its raw bit pattern.
    #[inline]
    pub fn load_bits(self, bytes: &[u8], i: usize) -> u64 {
        let w = self.width();
        let s = &bytes[i * w..i * w + w];
        match self {
            FloatDtype::F16 | FloatDtype::BF16 => u16::from_le_bytes([s[0], s[1]]) as u64,
            FloatDtype::F32 => u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64,
            FloatDtype::F64 => u64::from_le_bytes(s.try_into().expect("8 bytes")),
        }
    }

    /// Writes `bits` as element `i` of little-endian `bytes`.
    #[inline]
    pub fn store_bits(self, bytes: &mut [u8], i: usize, bits: u64) {
        let w = self.width();
        bytes[i * w..i * w + w].copy_from_slice(&bits.to_le_bytes()[..w]);
    }

    /// The value of a bit pattern, widened to f64 (exact for every type).
    #[inline]
    pub fn bits_to_f64(self, bits: u64) -> f64 {
        match self {
            FloatDtype::F16 => f16::from_bits(bits as u16).to_f64(),
            FloatDtype::BF16 => bf16::from_bits(bits as u16).to_f64(),
            FloatDtype::F32 => f32::from_bits(bits as u32) as f64,
            FloatDtype::F64 => f64::from_bits(bits),
        }
    }

    /// The value of a bit pattern as f32 (rounded for F64).
    #[inline]
    pub fn bits_to_f32(self, bits: u64) -> f32 {
        match self {
            FloatDtype::F16 => f16::from_bits(bits as u16).to_f32(),
            FloatDtype::BF16 => bf16::from_bits(bits as u16).to_f32(),
            FloatDtype::F32 => f32::from_bits(bits as u32),
            FloatDtype::F64 => f64::from_bits(bits) as f32,
        }
    }

    /// Bit pattern of the element nearest to `(q as f64) * scale`, computed
    /// the one way the format defines: in f32 for 16- and 32-bit types
    /// (exact product of a small integer and an f16 scale, then
    /// round-to-nearest-even into the type), in f64 for F64.
    #[inline]
    pub fn predict_bits(self, q: i32, scale: f16) -> u64 {
        match self {
            FloatDtype::F16 => f16::from_f32(q as f32 * scale.to_f32()).to_bits() as u64,
            FloatDtype::BF16 => bf16_bits_rne(q as f32 * scale.to_f32()) as u64,
            FloatDtype::F32 => (q as f32 * scale.to_f32()).to_bits() as u64,
            FloatDtype::F64 => (q as f64 * scale.to_f64()).to_bits(),
        }
    }

    /// Sign bit mask for this width.
    #[inline]
    pub const fn sign_mask(self) -> u64 {
        1u64 << (self.bits() - 1)
    }

    /// All-ones mask for this width.
    #[inline]
    pub const fn mask(self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Order-preserving bijection from bit patterns to unsigned keys: adjacent
    /// representable values get adjacent keys (with −0 and +0 adjacent), so
    /// the difference of the keys of two close values is a small integer.
    #[inline]
    pub fn order_key(self, bits: u64) -> u64 {
        if bits & self.sign_mask() != 0 {
            !bits & self.mask()
        } else {
            bits | self.sign_mask()
        }
    }

    /// Inverse of [`FloatDtype::order_key`].
    #[inline]
    pub fn from_order_key(self, key: u64) -> u64 {
        if key & self.sign_mask() != 0 {
            key & !self.sign_mask() & self.mask()
        } else {
            !key & self.mask()
        }
    }
}

/// f32 → bf16 bit pattern, round to nearest even; NaN stays NaN (quieted).
/// Identical to `half::bf16::from_f32` (tested), written out so it inlines.
#[inline(always)]
pub fn bf16_bits_rne(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_rounding_matches_half_on_edge_and_sampled_patterns() {
        let mut x = 0x1234_5678u32;
        let check = |b: u32| {
            let f = f32::from_bits(b);
            assert_eq!(
                super::bf16_bits_rne(f),
                half::bf16::from_f32(f).to_bits(),
                "{b:#x}"
            );
        };
        for b in [
            0,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0001,
            0x7F80_0001,
            0x7F7F_FFFF,
            0x0000_8000,
            0x0001_8000,
            0x3F80_8000,
            0x3F81_8000,
        ] {
            check(b);
        }
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            check(x);
        }
    }

    use super::FloatDtype;

    #[test]
    fn order_key_is_a_bijection_on_16_bit_patterns() {
        for dt in [FloatDtype::F16, FloatDtype::BF16] {
            let mut seen = vec![false; 1 << 16];
            for b in 0..=u16::MAX as u64 {
                let k = dt.order_key(b);
                assert!(k <= 0xFFFF);
                assert!(!seen[k as usize], "key {k} twice");
                seen[k as usize] = true;
                assert_eq!(dt.from_order_key(k), b);
            }
        }
    }

    #[test]
    fn order_key_is_monotonic_on_finite_values() {
        let dt = FloatDtype::BF16;
        let mut vals: Vec<u64> = (0..=u16::MAX as u64)
            .filter(|&b| dt.bits_to_f64(b).is_finite())
            .collect();
        vals.sort_by(|a, b| {
            dt.bits_to_f64(*a)
                .partial_cmp(&dt.bits_to_f64(*b))
                .unwrap()
                .then((a & 0x8000 == 0).cmp(&(b & 0x8000 == 0)))
        });
        for w in vals.windows(2) {
            assert!(dt.order_key(w[0]) < dt.order_key(w[1]));
        }
    }

    #[test]
    fn order_key_round_trips_wide_types_on_edge_patterns() {
        for dt in [FloatDtype::F32, FloatDtype::F64] {
            let m = dt.mask();
            let s = dt.sign_mask();
            for b in [
                0,
                1,
                s,
                s | 1,
                m,
                m ^ s,
                m >> 1,
                s >> 1,
                0x7FC0_0001 & m,
                12345 & m,
            ] {
                assert_eq!(dt.from_order_key(dt.order_key(b)), b);
            }
        }
    }
}
