//! Packet decode for a first packet (CONNECT expected) and for both protocol versions: never a
//! panic, and what decodes re-encodes to a packet that decodes the same.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice_core::packet::{self, Version};

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(Version::V311), Some(Version::V5)] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(p)) = packet::decode(&mut buf, version, 1 << 20) {
            let v = version.unwrap_or(Version::V311);
            let mut out = BytesMut::new();
            packet::encode(&p, v, &mut out);
            let again = packet::decode(&mut out, version, usize::MAX);
            assert!(matches!(again, Ok(Some(_))), "re-encoded packet does not decode: {p:?}");
        }
    }
});
