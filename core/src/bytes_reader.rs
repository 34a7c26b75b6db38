//! One cursor for every binary format core reads: MQTT packets ([`crate::packet`]), stored
//! sessions and retained messages ([`crate::session`]) and spill-log records
//! ([`crate::bridge::KafkaRecord::decode`]).
//!
//! [`ByteReader`] is generic over the buffer it walks ([`Buffer`]): over `Bytes` a taken slice is
//! a zero-copy view of the read buffer (MQTT payloads and binary properties cross shards as
//! `Bytes`); over `&[u8]` it borrows from the caller.
//!
//! Both byte orders are offered: MQTT is big-endian; the on-disk session and spill-record formats
//! are little-endian (written with `to_le_bytes`), and changing them would need a format version.
//!
//! Invariants:
//! - A read either returns its value and advances past it, or returns [`ReadError`] and leaves
//!   the cursor where it was.
//! - Nothing here allocates except [`ByteReader::str_u16`] / [`ByteReader::str_u32_le`], which
//!   return an owned `String` (one copy, after the UTF-8 check).
//! - The reader knows no format: what a short read or a bad string means (MQTT "malformed", a
//!   session record to drop) is the caller's to say.

use bytes::{Buf, Bytes};

/// Why a read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Fewer bytes are left than the value (or the announced length) needs.
    #[error("ends early: {wanted} bytes wanted, {left} left")]
    EndsEarly { wanted: usize, left: usize },
    /// A length-prefixed string is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    NotUtf8,
}

/// A buffer [`ByteReader`] can walk: cut at the front without copying.
pub trait Buffer: AsRef<[u8]> + Sized {
    /// Removes and returns the first `n` bytes; `n` is at most the length.
    fn split_front(&mut self, n: usize) -> Self;
    /// Drops the first `n` bytes; `n` is at most the length.
    fn skip(&mut self, n: usize);
}

impl Buffer for Bytes {
    #[inline]
    fn split_front(&mut self, n: usize) -> Self {
        self.split_to(n)
    }
    #[inline]
    fn skip(&mut self, n: usize) {
        self.advance(n);
    }
}

impl Buffer for &[u8] {
    #[inline]
    fn split_front(&mut self, n: usize) -> Self {
        let (front, back) = self.split_at(n);
        *self = back;
        front
    }
    #[inline]
    fn skip(&mut self, n: usize) {
        *self = &self[n..];
    }
}

/// A cursor over a buffer that turns running out of bytes into [`ReadError::EndsEarly`].
#[derive(Clone, Debug)]
pub struct ByteReader<B> {
    buf: B,
}

impl<B: Buffer> ByteReader<B> {
    pub fn new(buf: B) -> Self {
        ByteReader { buf }
    }

    /// Bytes not read yet.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.as_ref().len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The bytes not read yet, without consuming them.
    #[inline]
    pub fn peek(&self) -> &[u8] {
        self.buf.as_ref()
    }

    #[inline]
    fn check(&self, wanted: usize) -> Result<(), ReadError> {
        let left = self.remaining();
        if left < wanted {
            return Err(ReadError::EndsEarly { wanted, left });
        }
        Ok(())
    }

    /// Skips `n` bytes.
    #[inline]
    pub fn advance(&mut self, n: usize) -> Result<(), ReadError> {
        self.check(n)?;
        self.buf.skip(n);
        Ok(())
    }

    /// The next `n` bytes, as a slice of the buffer (zero-copy for `Bytes`).
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<B, ReadError> {
        self.check(n)?;
        Ok(self.buf.split_front(n))
    }

    /// Everything not read yet; the reader is empty afterwards.
    #[inline]
    pub fn rest(&mut self) -> B {
        let n = self.remaining();
        self.buf.split_front(n)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        self.check(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf.as_ref()[..N]);
        self.buf.skip(N);
        Ok(a)
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }
    /// Big-endian (network order, MQTT).
    #[inline]
    pub fn u16(&mut self) -> Result<u16, ReadError> {
        self.array().map(u16::from_be_bytes)
    }
    /// Big-endian (network order, MQTT).
    #[inline]
    pub fn u32(&mut self) -> Result<u32, ReadError> {
        self.array().map(u32::from_be_bytes)
    }
    /// Big-endian (network order).
    #[inline]
    pub fn u64(&mut self) -> Result<u64, ReadError> {
        self.array().map(u64::from_be_bytes)
    }
    /// Little-endian (the on-disk formats).
    #[inline]
    pub fn u16_le(&mut self) -> Result<u16, ReadError> {
        self.array().map(u16::from_le_bytes)
    }
    /// Little-endian (the on-disk formats).
    #[inline]
    pub fn u32_le(&mut self) -> Result<u32, ReadError> {
        self.array().map(u32::from_le_bytes)
    }
    /// Little-endian (the on-disk formats).
    #[inline]
    pub fn i64_le(&mut self) -> Result<i64, ReadError> {
        self.array().map(i64::from_le_bytes)
    }

    /// Bytes after a big-endian u16 length (MQTT binary data).
    #[inline]
    pub fn bytes_u16(&mut self) -> Result<B, ReadError> {
        let n = self.peek_len(2, |b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
        self.buf.skip(2);
        Ok(self.buf.split_front(n))
    }

    /// Bytes after a little-endian u32 length (the on-disk formats).
    #[inline]
    pub fn bytes_u32_le(&mut self) -> Result<B, ReadError> {
        let n = self.peek_len(4, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
        self.buf.skip(4);
        Ok(self.buf.split_front(n))
    }

    /// A UTF-8 string after a big-endian u16 length (an MQTT string, without MQTT's own extra
    /// rules such as no U+0000: those are the codec's).
    #[inline]
    pub fn str_u16(&mut self) -> Result<String, ReadError> {
        let len = 2 + self.peek_len(2, |b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
        let s = std::str::from_utf8(&self.buf.as_ref()[2..len]).map_err(|_| ReadError::NotUtf8)?.to_owned();
        self.buf.skip(len);
        Ok(s)
    }

    /// A UTF-8 string after a little-endian u32 length (the on-disk formats).
    #[inline]
    pub fn str_u32_le(&mut self) -> Result<String, ReadError> {
        let len = 4 + self.peek_len(4, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
        let s = std::str::from_utf8(&self.buf.as_ref()[4..len]).map_err(|_| ReadError::NotUtf8)?.to_owned();
        self.buf.skip(len);
        Ok(s)
    }

    /// The length in the `prefix` bytes at the front, checked against what follows them; consumes
    /// nothing, so a failed read leaves the cursor in place.
    #[inline]
    fn peek_len(&self, prefix: usize, len: impl FnOnce(&[u8]) -> usize) -> Result<usize, ReadError> {
        self.check(prefix)?;
        let n = len(&self.buf.as_ref()[..prefix]);
        let left = self.remaining() - prefix;
        if left < n {
            return Err(ReadError::EndsEarly { wanted: n, left });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_byte_orders_and_length_prefixes() {
        let mut b = vec![0x12, 0x34, 0x00, 0x00, 0x00, 0x2A, 0x34, 0x12];
        b.extend_from_slice(&[0, 2, b'h', b'i']);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-5i64).to_le_bytes());
        b.push(9);
        let mut r = ByteReader::new(&b[..]);
        assert_eq!(r.u16(), Ok(0x1234));
        assert_eq!(r.u32(), Ok(42));
        assert_eq!(r.u16_le(), Ok(0x1234));
        assert_eq!(r.str_u16().as_deref(), Ok("hi"));
        assert_eq!(r.bytes_u32_le(), Ok(&b"abc"[..]));
        assert_eq!(r.i64_le(), Ok(-5));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.rest(), &[9][..]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_failed_read_says_what_was_missing_and_consumes_nothing() {
        let mut r = ByteReader::new(Bytes::from_static(&[0, 5, b'a', b'b']));
        assert_eq!(r.bytes_u16(), Err(ReadError::EndsEarly { wanted: 5, left: 2 }));
        assert_eq!(r.u64(), Err(ReadError::EndsEarly { wanted: 8, left: 4 }));
        assert_eq!(r.remaining(), 4);
        assert_eq!(r.u16(), Ok(5));
        let ab = r.take(2).unwrap();
        assert_eq!(&ab[..], b"ab");
        assert_eq!(r.u8(), Err(ReadError::EndsEarly { wanted: 1, left: 0 }));
        let mut r = ByteReader::new(&[0u8, 1, 0xFF][..]);
        assert_eq!(r.str_u16(), Err(ReadError::NotUtf8));
        assert_eq!(r.remaining(), 3);
        assert_eq!(ReadError::EndsEarly { wanted: 4, left: 1 }.to_string(), "ends early: 4 bytes wanted, 1 left");
    }

    #[test]
    fn bytes_slices_share_the_buffer() {
        let whole = Bytes::from(vec![0u8, 3, 1, 2, 3]);
        let mut r = ByteReader::new(whole.clone());
        let s = r.bytes_u16().unwrap();
        assert_eq!(s.as_ptr(), whole[2..].as_ptr());
    }
}
