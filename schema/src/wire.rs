//! The Confluent wire format: magic byte 0, the schema id as 4 big-endian bytes, then the Avro
//! datum. What Confluent's serializers write and read, so Kafka consumers with their
//! deserializers read what the bridge writes.

use crate::PayloadError;

/// Bytes before the datum.
pub const HEADER_BYTES: usize = 5;

/// Appends the header for schema `id`.
pub fn write_header(id: u32, out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
}

/// The schema id and the datum of a wire-format payload.
pub fn split(payload: &[u8]) -> Result<(u32, &[u8]), PayloadError> {
    match payload {
        [0, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [m, ..] if *m != 0 => Err(PayloadError::NotWireFormat(format!("magic byte is {m}, not 0"))),
        _ => Err(PayloadError::NotWireFormat(format!("{} bytes, shorter than the 5-byte header", payload.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_bad_frames() {
        let mut b = Vec::new();
        write_header(0x0102_0304, &mut b);
        b.extend_from_slice(b"xy");
        assert_eq!(b, [0, 1, 2, 3, 4, b'x', b'y']);
        assert_eq!(split(&b).unwrap(), (0x0102_0304, &b"xy"[..]));
        assert_eq!(split(&[0, 0, 0, 0, 7]).unwrap(), (7, &[][..]));
        assert_eq!(
            split(b"{\"a\":1}").unwrap_err().to_string(),
            "not the Confluent wire format: magic byte is 123, not 0"
        );
        assert_eq!(
            split(&[0, 1]).unwrap_err().to_string(),
            "not the Confluent wire format: 2 bytes, shorter than the 5-byte header"
        );
        assert!(split(&[]).is_err());
    }
}
