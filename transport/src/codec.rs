//! The one codec every oxccl wire format is read and written with.
//!
//! A [`Writer`] appends little-endian integers, raw bytes and
//! length-prefixed bytes to a buffer; a [`Reader`] reads them back from a
//! byte slice. Every read checks what is left before it reads, so that no
//! input, however malformed, makes a decoder panic, overflow or allocate:
//! reads return borrowed slices, and length-prefixed reads take a maximum
//! and refuse a larger length before anyone allocates for it. A decoder
//! ends with [`Reader::finish`], which refuses trailing bytes.
//!
//! Errors are [`DecodeError`]s, whose messages name the format (given to
//! [`Reader::new`]: "frame header", "tcp store request") and the field.
//! Streams (sockets) read a message's fixed parts into a small array and
//! decode that with a [`Reader`]; variable-length parts are bounded through
//! [`Reader::len_prefix`] before they are read from the stream.

#![deny(unsafe_code)]

use std::fmt;

/// Width of a length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    /// One byte.
    U8,
    /// Two bytes, little-endian.
    U16,
    /// Four bytes, little-endian.
    U32,
    /// Eight bytes, little-endian.
    U64,
}

impl Prefix {
    /// Bytes the prefix takes on the wire.
    pub const fn width(self) -> usize {
        match self {
            Prefix::U8 => 1,
            Prefix::U16 => 2,
            Prefix::U32 => 4,
            Prefix::U64 => 8,
        }
    }

    /// The largest length the prefix can say.
    pub const fn max(self) -> u64 {
        match self {
            Prefix::U8 => u8::MAX as u64,
            Prefix::U16 => u16::MAX as u64,
            Prefix::U32 => u32::MAX as u64,
            Prefix::U64 => u64::MAX,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prefix::U8 => "u8",
            Prefix::U16 => "u16",
            Prefix::U32 => "u32",
            Prefix::U64 => "u64",
        })
    }
}

/// Why bytes could not be decoded. Every message starts with the format and
/// names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("{format}: truncated {field}: needs {needed} bytes, {available} left")]
    Truncated {
        /// The format being decoded ("frame header").
        format: &'static str,
        /// The field that did not fit.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// A length (or count) exceeds what the format allows.
    #[error("{format}: {field} of length {len} exceeds the limit of {max}")]
    TooLong {
        /// The format being decoded.
        format: &'static str,
        /// The field whose length is too large.
        field: &'static str,
        /// The length the input announces.
        len: u64,
        /// The largest length accepted.
        max: u64,
    },
    /// The input does not start with the format's magic number: not an
    /// oxccl peer, or a stream out of step.
    #[error("{format}: bad magic {} (not an oxccl {format})", Hex(.found))]
    BadMagic {
        /// The format being decoded.
        format: &'static str,
        /// The bytes found where the magic belongs.
        found: Vec<u8>,
    },
    /// A field holds a value the format does not allow.
    #[error("{format}: invalid {field}: {why}")]
    Invalid {
        /// The format being decoded.
        format: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Bytes follow the end of the message.
    #[error("{format}: {count} trailing bytes after the end of the message")]
    TrailingBytes {
        /// The format being decoded.
        format: &'static str,
        /// How many bytes follow.
        count: usize,
    },
}

impl DecodeError {
    /// The format whose decoding failed.
    pub fn format(&self) -> &'static str {
        match self {
            DecodeError::Truncated { format, .. }
            | DecodeError::TooLong { format, .. }
            | DecodeError::BadMagic { format, .. }
            | DecodeError::Invalid { format, .. }
            | DecodeError::TrailingBytes { format, .. } => format,
        }
    }
}

/// A length that does not fit the length prefix chosen for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes do not fit a {prefix} length prefix")]
pub struct EncodeError {
    /// The length.
    pub len: usize,
    /// The prefix.
    pub prefix: Prefix,
}

/// Bytes as hex, for messages.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Appends a message's fields to a buffer. Integers are little-endian.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    #[inline]
    pub fn new() -> Writer {
        Writer::default()
    }

    /// An empty writer with room for `n` bytes.
    #[inline]
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes written, as the array of a fixed-size format. The format's
    /// encoder writes exactly `N` bytes (its tests check it); were it to
    /// write another number, the array would be cut or padded with zeros.
    #[inline]
    pub fn into_array<const N: usize>(self) -> [u8; N] {
        debug_assert_eq!(self.buf.len(), N, "fixed-size format of the wrong length");
        let mut out = [0u8; N];
        let n = self.buf.len().min(N);
        out[..n].copy_from_slice(&self.buf[..n]);
        out
    }

    /// Appends a `u8`.
    #[inline]
    pub fn u8(&mut self, v: u8) -> &mut Writer {
        self.buf.push(v);
        self
    }

    /// Appends a little-endian `u16`.
    #[inline]
    pub fn u16(&mut self, v: u16) -> &mut Writer {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    #[inline]
    pub fn u32(&mut self, v: u32) -> &mut Writer {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    #[inline]
    pub fn u64(&mut self, v: u64) -> &mut Writer {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `i64`.
    #[inline]
    pub fn i64(&mut self, v: i64) -> &mut Writer {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends `n` zero bytes (padding, reserved fields).
    pub fn zeros(&mut self, n: usize) -> &mut Writer {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }

    /// Appends raw bytes, without a length.
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) -> &mut Writer {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends a length prefix of width `prefix` alone (for formats whose
    /// length covers bytes written separately).
    pub fn len_prefix(&mut self, prefix: Prefix, len: usize) -> Result<&mut Writer, EncodeError> {
        let too_long = EncodeError { len, prefix };
        let wide = u64::try_from(len).map_err(|_| too_long.clone())?;
        if wide > prefix.max() {
            return Err(too_long);
        }
        // The checks above make these casts exact.
        Ok(match prefix {
            Prefix::U8 => self.u8(wide as u8),
            Prefix::U16 => self.u16(wide as u16),
            Prefix::U32 => self.u32(wide as u32),
            Prefix::U64 => self.u64(wide),
        })
    }

    /// Appends `b`'s length as a prefix of width `prefix`, then `b`.
    pub fn bytes_prefixed(&mut self, prefix: Prefix, b: &[u8]) -> Result<&mut Writer, EncodeError> {
        self.len_prefix(prefix, b.len())?;
        Ok(self.bytes(b))
    }

    /// Appends `s`'s length in bytes as a prefix of width `prefix`, then its UTF-8.
    pub fn str_prefixed(&mut self, prefix: Prefix, s: &str) -> Result<&mut Writer, EncodeError> {
        self.bytes_prefixed(prefix, s.as_bytes())
    }

    /// Appends `b`'s length as a `u64`, then `b`. A `u64` holds every
    /// length, so this cannot fail.
    pub fn bytes_u64_prefixed(&mut self, b: &[u8]) -> &mut Writer {
        self.u64(b.len() as u64);
        self.bytes(b)
    }

    /// Appends `s`'s length in bytes as a `u64`, then its UTF-8.
    pub fn str_u64_prefixed(&mut self, s: &str) -> &mut Writer {
        self.bytes_u64_prefixed(s.as_bytes())
    }
}

/// Where fixed-layout encoders write: a [`Writer`] (growing, for messages
/// of any size) or an [`ArrayWriter`] (on the stack, for the fixed-size
/// formats written on the hot path). Integers are little-endian.
pub trait Put {
    /// Appends raw bytes.
    fn put(&mut self, b: &[u8]) -> &mut Self;

    /// Appends a `u8`.
    #[inline]
    fn put_u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v])
    }

    /// Appends a field of a fixed width `K` (an integer's bytes, an array).
    #[inline]
    fn put_array<const K: usize>(&mut self, b: [u8; K]) -> &mut Self {
        self.put(&b)
    }

    /// Appends a little-endian `u32`.
    #[inline]
    fn put_u32(&mut self, v: u32) -> &mut Self {
        self.put_array(v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    #[inline]
    fn put_u64(&mut self, v: u64) -> &mut Self {
        self.put_array(v.to_le_bytes())
    }
}

impl Put for Writer {
    #[inline]
    fn put(&mut self, b: &[u8]) -> &mut Writer {
        self.bytes(b)
    }
}

/// A writer of a fixed-size format into an array on the stack: no
/// allocation, for what is written for every frame or call.
#[derive(Debug, Clone, Copy)]
pub struct ArrayWriter<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for ArrayWriter<N> {
    fn default() -> Self {
        ArrayWriter {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> ArrayWriter<N> {
    /// An empty array writer.
    #[inline]
    pub fn new() -> Self {
        Self::default()
    }

    /// The array. The format's encoder writes exactly `N` bytes (its tests
    /// check it); bytes it did not write are zero.
    #[inline]
    pub fn finish(self) -> [u8; N] {
        debug_assert_eq!(self.len, N, "fixed-size format of the wrong length");
        self.buf
    }
}

impl<const N: usize> Put for ArrayWriter<N> {
    /// Appends raw bytes; bytes past `N` are dropped (a bug in the format's
    /// encoder, which its tests catch), never written out of bounds.
    #[inline]
    fn put(&mut self, b: &[u8]) -> &mut Self {
        let start = self.len;
        self.len = start.saturating_add(b.len());
        match self.buf.get_mut(start..self.len) {
            Some(dst) => dst.copy_from_slice(b),
            None => {
                let tail = self.buf.get_mut(start.min(N)..).unwrap_or_default();
                let n = tail.len();
                tail.copy_from_slice(&b[..n]);
            }
        }
        self
    }

    /// A field of a width known when compiled: a few moves, not a call to
    /// `memcpy` (frame headers are encoded on every frame).
    #[inline]
    fn put_array<const K: usize>(&mut self, b: [u8; K]) -> &mut Self {
        let start = self.len;
        self.len = start.saturating_add(K);
        match self
            .buf
            .get_mut(start..self.len)
            .and_then(|d| <&mut [u8; K]>::try_from(d).ok())
        {
            Some(dst) => *dst = b,
            None => {
                self.len = start;
                self.put(&b);
            }
        }
        self
    }
}

/// Reads a message's fields from a byte slice, refusing every malformed
/// input with a [`DecodeError`] that names the format and the field.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    format: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, a message of `format` (named in every error).
    pub fn new(format: &'static str, buf: &'a [u8]) -> Reader<'a> {
        Reader {
            format,
            buf,
            pos: 0,
        }
    }

    /// The format's name.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An [`DecodeError::Invalid`] of this format, for checks the caller makes.
    pub fn invalid(&self, field: &'static str, why: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            format: self.format,
            field,
            why: why.into(),
        }
    }

    /// A [`DecodeError::TooLong`] of this format.
    fn too_long(&self, field: &'static str, len: u64, max: u64) -> DecodeError {
        DecodeError::TooLong {
            format: self.format,
            field,
            len,
            max,
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let available = self.remaining();
        if n > available {
            return Err(DecodeError::Truncated {
                format: self.format,
                field,
                needed: n,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `N` bytes, as an array.
    #[inline]
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(field, N)?);
        Ok(out)
    }

    /// Skips `n` bytes (padding, reserved fields), whatever they hold.
    #[inline]
    pub fn skip(&mut self, field: &'static str, n: usize) -> Result<(), DecodeError> {
        self.bytes(field, n).map(|_| ())
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian `i64`.
    pub fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian `u64` that must fit a `usize`.
    pub fn u64_usize(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.u64(field)?;
        usize::try_from(v).map_err(|_| self.invalid(field, format!("{v} does not fit a usize")))
    }

    /// Reads a length prefix of width `prefix` and refuses a length over
    /// `max`. The bytes it counts are not read: a stream reads them next, at
    /// most `max` of them.
    pub fn len_prefix(
        &mut self,
        field: &'static str,
        prefix: Prefix,
        max: usize,
    ) -> Result<usize, DecodeError> {
        let len = match prefix {
            Prefix::U8 => u64::from(self.u8(field)?),
            Prefix::U16 => u64::from(self.u16(field)?),
            Prefix::U32 => u64::from(self.u32(field)?),
            Prefix::U64 => self.u64(field)?,
        };
        let max_wide = u64::try_from(max).unwrap_or(u64::MAX);
        if len > max_wide {
            return Err(self.too_long(field, len, max_wide));
        }
        // len <= max, which is a usize.
        Ok(len as usize)
    }

    /// Reads a count of items of at least `item_len` bytes each (prefix of
    /// width `prefix`), refusing a count that the bytes left cannot hold, so
    /// that the caller may allocate for it.
    pub fn count(
        &mut self,
        field: &'static str,
        prefix: Prefix,
        item_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.len_prefix(field, prefix, usize::MAX)?;
        let fits = self.remaining() / item_len.max(1);
        if n > fits {
            return Err(self.too_long(field, n as u64, fits as u64));
        }
        Ok(n)
    }

    /// Reads a length prefix of width `prefix` (at most `max`) and that many bytes.
    pub fn bytes_prefixed(
        &mut self,
        field: &'static str,
        prefix: Prefix,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.len_prefix(field, prefix, max)?;
        self.bytes(field, len)
    }

    /// Reads a length prefix of width `prefix` (at most `max`) and that many
    /// bytes of UTF-8.
    pub fn str_prefixed(
        &mut self,
        field: &'static str,
        prefix: Prefix,
        max: usize,
    ) -> Result<&'a str, DecodeError> {
        let b = self.bytes_prefixed(field, prefix, max)?;
        std::str::from_utf8(b).map_err(|e| self.invalid(field, format!("not UTF-8 ({e})")))
    }

    /// Reads `n` bytes of UTF-8.
    pub fn str(&mut self, field: &'static str, n: usize) -> Result<&'a str, DecodeError> {
        let b = self.bytes(field, n)?;
        std::str::from_utf8(b).map_err(|e| self.invalid(field, format!("not UTF-8 ({e})")))
    }

    /// Reads a magic number of `expected.len()` bytes and refuses any other.
    #[inline]
    pub fn magic(&mut self, expected: &[u8]) -> Result<(), DecodeError> {
        let found = self.bytes("magic", expected.len())?;
        if found != expected {
            return Err(DecodeError::BadMagic {
                format: self.format,
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// Reads a little-endian `u32` magic number and refuses any other.
    #[inline]
    pub fn magic_u32(&mut self, expected: u32) -> Result<(), DecodeError> {
        self.magic(&expected.to_le_bytes())
    }

    /// Ends the message: refuses bytes after it.
    #[inline]
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                format: self.format,
                count,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The array writer writes what the growable one does, and drops
    /// (never writes out of bounds) what does not fit, through either path.
    #[test]
    fn the_array_writer_matches_the_writer_and_drops_overflow() {
        let mut a = ArrayWriter::<18>::new();
        a.put_u32(7)
            .put_u64(u64::MAX - 1)
            .put(&[1, 2])
            .put_array([3u8; 4]);
        let mut w = Writer::new();
        w.put_u32(7)
            .put_u64(u64::MAX - 1)
            .put(&[1, 2])
            .put_array([3u8; 4]);
        assert_eq!(a.finish().as_slice(), w.as_bytes());
        let mut short = ArrayWriter::<6>::new();
        short
            .put_u32(0x0403_0201)
            .put_u32(0x0807_0605)
            .put_array([9u8; 3]);
        assert_eq!(short.buf, [1, 2, 3, 4, 5, 6]);
        assert_eq!(short.len, 11);
    }

    #[test]
    fn integers_are_little_endian_and_round_trip() {
        let mut w = Writer::new();
        w.u8(0xAB)
            .u16(0x0102)
            .u32(0x0304_0506)
            .u64(0x0708_090A_0B0C_0D0E)
            .i64(-2)
            .zeros(2)
            .bytes(b"xy");
        assert_eq!(
            w.as_bytes(),
            [
                0xAB, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x0E, 0x0D, 0x0C, 0x0B, 0x0A, 0x09, 0x08,
                0x07, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, b'x', b'y'
            ]
        );
        let bytes = w.into_bytes();
        let mut r = Reader::new("test", &bytes);
        assert_eq!(r.u8("a").unwrap(), 0xAB);
        assert_eq!(r.u16("b").unwrap(), 0x0102);
        assert_eq!(r.u32("c").unwrap(), 0x0304_0506);
        assert_eq!(r.u64("d").unwrap(), 0x0708_090A_0B0C_0D0E);
        assert_eq!(r.i64("e").unwrap(), -2);
        r.skip("pad", 2).unwrap();
        assert_eq!(r.array::<2>("f").unwrap(), *b"xy");
        r.finish().unwrap();
    }

    #[test]
    fn errors_name_format_and_field() {
        let mut r = Reader::new("frame header", &[1, 2, 3]);
        let e = r.u32("length").unwrap_err();
        assert_eq!(
            e,
            DecodeError::Truncated {
                format: "frame header",
                field: "length",
                needed: 4,
                available: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "frame header: truncated length: needs 4 bytes, 3 left"
        );
        assert_eq!(e.format(), "frame header");
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
        assert_eq!(
            r.magic(b"OX").unwrap_err().to_string(),
            "frame header: bad magic 0x0102 (not an oxccl frame header)"
        );
        let e = Reader::new("x", &[0]).finish().unwrap_err();
        assert_eq!(
            e.to_string(),
            "x: 1 trailing bytes after the end of the message"
        );
        let e = Reader::new("x", &[0xFF, 0xFE])
            .str_prefixed("key", Prefix::U8, 1000)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e:?}");
        let e = Reader::new("x", &[2, 0xFF, 0xFE])
            .str_prefixed("key", Prefix::U8, 10)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("x: invalid key: not UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn lengths_over_the_maximum_are_refused_before_reading() {
        let mut w = Writer::new();
        w.bytes_prefixed(Prefix::U32, &[7; 11]).unwrap();
        let bytes = w.into_bytes();
        let e = Reader::new("store", &bytes)
            .bytes_prefixed("value", Prefix::U32, 10)
            .unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLong {
                format: "store",
                field: "value",
                len: 11,
                max: 10
            }
        );
        assert_eq!(
            e.to_string(),
            "store: value of length 11 exceeds the limit of 10"
        );
        // A huge announced length with nothing behind it: refused, not allocated.
        let e = Reader::new("store", &u64::MAX.to_le_bytes())
            .len_prefix("value", Prefix::U64, 1 << 20)
            .unwrap_err();
        assert!(matches!(e, DecodeError::TooLong { len: u64::MAX, .. }));
        // Counts are bounded by what the bytes left can hold.
        let mut w = Writer::new();
        w.u64(3).zeros(5);
        let bytes = w.into_bytes();
        assert!(
            Reader::new("l", &bytes)
                .count("items", Prefix::U64, 2)
                .is_err()
        );
        assert_eq!(
            Reader::new("l", &bytes)
                .count("items", Prefix::U64, 1)
                .unwrap(),
            3
        );
    }

    #[test]
    fn writer_refuses_lengths_its_prefix_cannot_say() {
        let mut w = Writer::new();
        assert_eq!(
            w.bytes_prefixed(Prefix::U8, &[0; 256]).unwrap_err(),
            EncodeError {
                len: 256,
                prefix: Prefix::U8
            }
        );
        assert!(w.is_empty(), "nothing written on error");
        w.bytes_prefixed(Prefix::U8, &[0; 255]).unwrap();
        assert_eq!(w.len(), 256);
        let mut w = Writer::new();
        w.str_prefixed(Prefix::U16, "héllo").unwrap();
        let bytes = w.into_bytes();
        let mut r = Reader::new("s", &bytes);
        assert_eq!(r.str_prefixed("s", Prefix::U16, 6).unwrap(), "héllo");
        r.finish().unwrap();
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            Just(Prefix::U8),
            Just(Prefix::U16),
            Just(Prefix::U32),
            Just(Prefix::U64)
        ]
    }

    proptest! {
        #[test]
        fn prefixed_bytes_round_trip(prefix in prefix(), b in proptest::collection::vec(any::<u8>(), 0..300), s in ".{0,40}") {
            let mut w = Writer::new();
            let fits = b.len() as u64 <= prefix.max();
            prop_assert_eq!(w.bytes_prefixed(prefix, &b).is_ok(), fits);
            w.str_u64_prefixed(&s);
            let bytes = w.into_bytes();
            let mut r = Reader::new("p", &bytes);
            if fits {
                prop_assert_eq!(r.bytes_prefixed("b", prefix, b.len()).unwrap(), &b[..]);
            }
            prop_assert_eq!(r.str_prefixed("s", Prefix::U64, s.len()).unwrap(), s.as_str());
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), prefix in prefix(), max in 0usize..100) {
            let mut r = Reader::new("p", &bytes);
            let _ = r.str_prefixed("s", prefix, max);
            let _ = r.count("n", prefix, 3);
            let _ = r.u64_usize("u");
            let _ = r.magic(b"OXCCL");
            let _ = r.i64("i");
            let _ = r.finish();
        }
    }
}
