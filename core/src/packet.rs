//! MQTT 3.1.1 and 5.0 control packets: one in-memory form for both versions, and the codec.
//!
//! Why our own codec rather than `mqttbytes`: the broker needs every MQTT 5 property on every packet
//! (AUTH, subscription identifiers, will properties), per-property validation that yields the exact
//! reason code (0x81 malformed vs 0x82 protocol error vs 0x95 too large) and zero-copy payloads that
//! cross shards as `Bytes`. mqttbytes 0.6 is still used, as an independent implementation, by the
//! Rust test client in `tests/`.
//!
//! Invariants:
//! - [`decode`] consumes bytes only when it returns a whole packet; `Ok(None)` means "not yet".
//! - A packet larger than the configured maximum is refused from its fixed header alone, before
//!   its body is buffered.
//! - [`decode`] never grows the buffer: memory for an incomplete packet follows the bytes that
//!   arrived, never the length its fixed header announces.
//! - Everything [`decode`] accepts, [`encode`] writes back byte-identical for the same version.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::bytes_reader::{ByteReader, ReadError};

/// Protocol level byte in CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// MQTT 5 reason codes (also used, mapped, for 3.1.1 return codes).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS1: u8 = 0x01;
    pub const GRANTED_QOS2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

/// Why a byte stream could not be decoded: the MQTT 5 reason code to close the connection with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} (reason code {code:#04x})")]
pub struct DecodeError {
    pub code: u8,
    pub what: &'static str,
}

fn malformed(what: &'static str) -> DecodeError {
    DecodeError { code: reason::MALFORMED_PACKET, what }
}
fn protocol(what: &'static str) -> DecodeError {
    DecodeError { code: reason::PROTOCOL_ERROR, what }
}

/// MQTT 5 properties. One struct for every packet; [`decode`] refuses a property the packet may
/// not carry, so a field is only ever set where the spec allows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// No property set; what `Properties::default()` builds, usable by reference without building.
    pub const EMPTY: Properties = Properties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        subscription_identifiers: Vec::new(),
        session_expiry_interval: None,
        assigned_client_identifier: None,
        server_keep_alive: None,
        authentication_method: None,
        authentication_data: None,
        request_problem_information: None,
        will_delay_interval: None,
        request_response_information: None,
        response_information: None,
        server_reference: None,
        reason_string: None,
        receive_maximum: None,
        topic_alias_maximum: None,
        topic_alias: None,
        maximum_qos: None,
        retain_available: None,
        user_properties: Vec::new(),
        maximum_packet_size: None,
        wildcard_subscription_available: None,
        subscription_identifier_available: None,
        shared_subscription_available: None,
    };

    pub fn is_empty(&self) -> bool {
        *self == Properties::EMPTY
    }

    /// Boxed when any property is set: most messages carry none, and a message that is shared
    /// by every queue it sits in should not carry the whole struct.
    pub fn boxed(self) -> Option<Box<Properties>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 5 reason code; for 3.1.1 the encoder maps it to a return code 0..=5.
    pub code: u8,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub packet_id: u16,
    pub properties: PublishProperties,
    pub payload: Bytes,
}

/// A PUBLISH's properties, boxed only when it has some: every 3.1.1 PUBLISH and most MQTT 5
/// ones have none, and the decoded packet is moved through the handlers (the whole
/// [`Properties`] is ~350 bytes). Reads go through `Deref` (no properties reads as
/// [`Properties::EMPTY`]); `DerefMut` boxes an empty set on first write, so hot paths that
/// only may write use [`PublishProperties::get_mut`].
#[derive(Clone, Default)]
pub struct PublishProperties(Option<Box<Properties>>);

impl PublishProperties {
    /// The properties if any is set (`None` reads as empty).
    pub fn get_mut(&mut self) -> Option<&mut Properties> {
        self.0.as_deref_mut()
    }

    /// The box, `None` when there are no properties (or only empty ones were written).
    pub fn into_boxed(self) -> Option<Box<Properties>> {
        self.0.filter(|p| !p.is_empty())
    }
}

impl From<Properties> for PublishProperties {
    fn from(p: Properties) -> Self {
        PublishProperties(p.boxed())
    }
}

impl std::ops::Deref for PublishProperties {
    type Target = Properties;
    fn deref(&self) -> &Properties {
        static NONE: Properties = Properties::EMPTY;
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for PublishProperties {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Default::default)
    }
}

impl PartialEq for PublishProperties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PublishProperties {}

impl std::fmt::Debug for PublishProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubResp {
    pub packet_id: u16,
    pub code: u8,
    pub properties: Properties,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub filters: Vec<(String, SubOptions)>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub codes: Vec<u8>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<String>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    /// Empty for 3.1.1 (which has no reason codes here).
    pub codes: Vec<u8>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u8,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    pub code: u8,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Where a property set appears; decides which property identifiers are allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

fn allowed(id: u8, ctx: Ctx) -> bool {
    use Ctx::*;
    match id {
        0x01..=0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == ConnAck,
        0x15 | 0x16 => matches!(ctx, Connect | ConnAck | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, ConnAck | Disconnect),
        0x1F => !matches!(ctx, Connect | Publish | Will | Subscribe | Unsubscribe),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | ConnAck),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

/// Reads the variable byte integer at the front of `buf` without consuming it.
/// `Ok(None)`: more bytes needed. Returns the value and how many bytes it took.
fn peek_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(malformed("variable byte integer longer than 4 bytes"))
}

/// A cursor over one packet's body ([`ByteReader`] over `Bytes`: strings and payloads are
/// zero-copy slices of the read buffer) that turns running out of bytes into "malformed".
struct Reader(ByteReader<Bytes>);

impl Reader {
    #[inline]
    fn remaining(&self) -> usize {
        self.0.remaining()
    }
    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.0.u8().map_err(|_| malformed("packet ends early"))
    }
    #[inline]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.0.u16().map_err(|_| malformed("packet ends early"))
    }
    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.0.u32().map_err(|_| malformed("packet ends early"))
    }
    fn varint(&mut self) -> Result<u32, DecodeError> {
        match peek_varint(self.0.peek())? {
            Some((v, n)) => {
                self.0.advance(n).map_err(|_| malformed("packet ends inside a variable byte integer"))?;
                Ok(v)
            }
            None => Err(malformed("packet ends inside a variable byte integer")),
        }
    }
    #[inline]
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.0.take(n).map_err(|_| malformed("length runs past the end of the packet"))
    }
    #[inline]
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        self.0.bytes_u16().map_err(|_| self.short_prefixed())
    }
    /// A length-prefixed field that did not fit: its length itself missing, or what it announces.
    fn short_prefixed(&self) -> DecodeError {
        if self.0.remaining() < 2 {
            malformed("packet ends early")
        } else {
            malformed("length runs past the end of the packet")
        }
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let s = self.0.str_u16().map_err(|e| match e {
            ReadError::NotUtf8 => malformed("string is not valid UTF-8"),
            _ => self.short_prefixed(),
        })?;
        if s.contains('\0') {
            return Err(malformed("string contains U+0000"));
        }
        Ok(s)
    }
    fn rest(&mut self) -> Bytes {
        self.0.rest()
    }

    fn properties(&mut self, ctx: Ctx) -> Result<Properties, DecodeError> {
        let len = self.varint()? as usize;
        let mut r = Reader(ByteReader::new(self.take(len)?));
        let mut p = Properties::default();
        fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
            if slot.is_some() {
                return Err(protocol("property appears twice"));
            }
            *slot = Some(v);
            Ok(())
        }
        fn flag(v: u8) -> Result<u8, DecodeError> {
            if v > 1 {
                return Err(protocol("property must be 0 or 1"));
            }
            Ok(v)
        }
        while r.remaining() > 0 {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| malformed("unknown property identifier"))?;
            if !allowed(id, ctx) {
                return Err(malformed("property not allowed on this packet"));
            }
            match id {
                0x01 => once(&mut p.payload_format_indicator, flag(r.u8()?)?)?,
                0x02 => once(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => once(&mut p.content_type, r.string()?)?,
                0x08 => once(&mut p.response_topic, r.string()?)?,
                0x09 => once(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(protocol("subscription identifier 0"));
                    }
                    if ctx == Ctx::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(protocol("property appears twice"));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => once(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => once(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => once(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => once(&mut p.authentication_method, r.string()?)?,
                0x16 => once(&mut p.authentication_data, r.binary()?)?,
                0x17 => once(&mut p.request_problem_information, flag(r.u8()?)?)?,
                0x18 => once(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => once(&mut p.request_response_information, flag(r.u8()?)?)?,
                0x1A => once(&mut p.response_information, r.string()?)?,
                0x1C => once(&mut p.server_reference, r.string()?)?,
                0x1F => once(&mut p.reason_string, r.string()?)?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(protocol("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                0x22 => once(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError { code: reason::TOPIC_ALIAS_INVALID, what: "topic alias 0" });
                    }
                    once(&mut p.topic_alias, v)?
                }
                0x24 => once(&mut p.maximum_qos, flag(r.u8()?)?)?,
                0x25 => once(&mut p.retain_available, flag(r.u8()?)?)?,
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(protocol("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                0x28 => once(&mut p.wildcard_subscription_available, flag(r.u8()?)?)?,
                0x29 => once(&mut p.subscription_identifier_available, flag(r.u8()?)?)?,
                0x2A => once(&mut p.shared_subscription_available, flag(r.u8()?)?)?,
                _ => return Err(malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }
}

/// Takes one whole packet off the front of `buf`: its first byte and a reader over its body
/// (`None` while it is not all there; nothing is consumed then).
fn take_frame(buf: &mut BytesMut, max_size: usize) -> Result<Option<(u8, Reader)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some((remaining, varint_len)) = peek_varint(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + varint_len + remaining as usize;
    if total > max_size {
        return Err(DecodeError { code: reason::PACKET_TOO_LARGE, what: "packet exceeds maximum packet size" });
    }
    if buf.len() < total {
        // Not yet. No reserve for the announced length: a peer that announces 1 MiB and sends ten
        // bytes must hold ten bytes, not 1 MiB. The caller's buffer grows with what arrives.
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(total);
    frame.advance(1 + varint_len);
    Ok(Some((first, Reader(ByteReader::new(frame.freeze())))))
}

/// [`decode`] for a connection past CONNECT whose next packet is a PUBLISH (`buf[0] >> 4 ==
/// 3`; the caller checked), returned as the [`Publish`] itself: exactly what [`decode`] would
/// put in [`Packet::Publish`], without building and moving the larger `Packet`.
pub fn decode_publish(buf: &mut BytesMut, version: Version, max_size: usize) -> Result<Option<Publish>, DecodeError> {
    debug_assert_eq!(buf.first().map(|b| b >> 4), Some(3));
    let Some((first, mut r)) = take_frame(buf, max_size)? else { return Ok(None) };
    publish(&mut r, first & 0x0F, version.is_v5()).map(Some)
}

/// The body of a PUBLISH with fixed-header `flags`.
fn publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let qos = (flags >> 1) & 0b11;
    if qos == 3 {
        return Err(malformed("PUBLISH with QoS 3"));
    }
    let dup = flags & 0b1000 != 0;
    if dup && qos == 0 {
        return Err(malformed("PUBLISH with DUP set at QoS 0"));
    }
    let topic = r.string()?;
    let packet_id = if qos > 0 { r.u16()? } else { 0 };
    if qos > 0 && packet_id == 0 {
        return Err(malformed("packet identifier 0"));
    }
    let properties = if v5 { r.properties(Ctx::Publish)?.into() } else { PublishProperties::default() };
    Ok(Publish { dup, qos, retain: flags & 1 != 0, topic, packet_id, properties, payload: r.rest() })
}

/// Decodes one packet from the front of `buf`.
///
/// `version` is the connection's negotiated version (`None` before CONNECT: only CONNECT is
/// accepted then). `max_size` bounds the whole packet, fixed header included. Returns
/// `Ok(None)` when `buf` does not yet hold a whole packet; nothing is consumed then.
pub fn decode(buf: &mut BytesMut, version: Option<Version>, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some((first, mut r)) = take_frame(buf, max_size)? else { return Ok(None) };
    let kind = first >> 4;
    let flags = first & 0x0F;
    let Some(version) = version else {
        if kind != 1 {
            return Err(protocol("first packet is not CONNECT"));
        }
        return decode_connect(&mut r, flags).map(|c| Some(Packet::Connect(Box::new(c))));
    };
    let v5 = version.is_v5();
    let need_flags = |want: u8| -> Result<(), DecodeError> {
        if flags != want {
            return Err(malformed("reserved fixed header flags are wrong"));
        }
        Ok(())
    };
    let packet = match kind {
        1 => return Err(protocol("second CONNECT")),
        3 => Packet::Publish(publish(&mut r, flags, v5)?),
        4..=7 => {
            need_flags(if kind == 6 { 0b0010 } else { 0 })?;
            let packet_id = r.u16()?;
            let (code, properties) = if v5 && r.remaining() > 0 {
                let code = r.u8()?;
                let props = if r.remaining() > 0 { r.properties(Ctx::PubResp)? } else { Properties::default() };
                (code, props)
            } else {
                (reason::SUCCESS, Properties::default())
            };
            let resp = PubResp { packet_id, code, properties };
            match kind {
                4 => Packet::PubAck(resp),
                5 => Packet::PubRec(resp),
                6 => Packet::PubRel(resp),
                _ => Packet::PubComp(resp),
            }
        }
        8 => {
            need_flags(0b0010)?;
            let packet_id = r.u16()?;
            if packet_id == 0 {
                return Err(malformed("packet identifier 0"));
            }
            let properties = if v5 { r.properties(Ctx::Subscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                let f = r.string()?;
                let o = r.u8()?;
                let opts = if v5 {
                    if o & 0b1100_0000 != 0 || (o >> 4) & 0b11 == 3 {
                        return Err(malformed("reserved subscription option bits set"));
                    }
                    SubOptions {
                        qos: o & 0b11,
                        no_local: o & 0b100 != 0,
                        retain_as_published: o & 0b1000 != 0,
                        retain_handling: (o >> 4) & 0b11,
                    }
                } else {
                    if o & 0b1111_1100 != 0 {
                        return Err(malformed("reserved subscription option bits set"));
                    }
                    SubOptions { qos: o, ..Default::default() }
                };
                if opts.qos == 3 {
                    return Err(malformed("subscription QoS 3"));
                }
                filters.push((f, opts));
            }
            if filters.is_empty() {
                return Err(protocol("SUBSCRIBE without topic filters"));
            }
            Packet::Subscribe(Subscribe { packet_id, filters, properties })
        }
        9 => {
            need_flags(0)?;
            let packet_id = r.u16()?;
            let properties = if v5 { r.properties(Ctx::SubAck)? } else { Properties::default() };
            let codes = r.rest().to_vec();
            Packet::SubAck(SubAck { packet_id, codes, properties })
        }
        10 => {
            need_flags(0b0010)?;
            let packet_id = r.u16()?;
            if packet_id == 0 {
                return Err(malformed("packet identifier 0"));
            }
            let properties = if v5 { r.properties(Ctx::Unsubscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe { packet_id, filters, properties })
        }
        11 => {
            need_flags(0)?;
            let packet_id = r.u16()?;
            let (properties, codes) = if v5 {
                (r.properties(Ctx::UnsubAck)?, r.rest().to_vec())
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck { packet_id, codes, properties })
        }
        12 | 13 => {
            need_flags(0)?;
            if r.remaining() != 0 {
                return Err(malformed("PINGREQ/PINGRESP with a body"));
            }
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => {
            need_flags(0)?;
            let (code, properties) = if v5 && r.remaining() > 0 {
                let code = r.u8()?;
                let props = if r.remaining() > 0 { r.properties(Ctx::Disconnect)? } else { Properties::default() };
                (code, props)
            } else {
                (reason::SUCCESS, Properties::default())
            };
            if !v5 && r.remaining() != 0 {
                return Err(malformed("DISCONNECT with a body"));
            }
            Packet::Disconnect(Disconnect { code, properties })
        }
        15 if v5 => {
            need_flags(0)?;
            let (code, properties) = if r.remaining() > 0 {
                let code = r.u8()?;
                (code, r.properties(Ctx::Auth)?)
            } else {
                (reason::SUCCESS, Properties::default())
            };
            Packet::Auth(Auth { code, properties })
        }
        2 => {
            need_flags(0)?;
            let ack = r.u8()?;
            if ack & 0xFE != 0 {
                return Err(malformed("reserved CONNACK flags set"));
            }
            let mut code = r.u8()?;
            let properties = if v5 { r.properties(Ctx::ConnAck)? } else { Properties::default() };
            if !v5 {
                code = v311_connack_to_v5(code);
            }
            Packet::ConnAck(ConnAck { session_present: ack == 1, code, properties })
        }
        _ => return Err(malformed("reserved packet type")),
    };
    if r.remaining() != 0 {
        return Err(malformed("bytes left over at the end of the packet"));
    }
    Ok(Some(packet))
}

fn decode_connect(r: &mut Reader, flags: u8) -> Result<Connect, DecodeError> {
    if flags != 0 {
        return Err(malformed("reserved fixed header flags are wrong"));
    }
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", _) | (b"MQIsdp", 3) => {
            return Err(DecodeError { code: reason::UNSUPPORTED_PROTOCOL_VERSION, what: "unsupported protocol level" })
        }
        _ => return Err(protocol("protocol name is not MQTT")),
    };
    let cf = r.u8()?;
    if cf & 1 != 0 {
        return Err(malformed("reserved CONNECT flag set"));
    }
    let will_flag = cf & 0b100 != 0;
    let will_qos = (cf >> 3) & 0b11;
    let will_retain = cf & 0b10_0000 != 0;
    let has_password = cf & 0b100_0000 != 0;
    let has_username = cf & 0b1000_0000 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(malformed("will QoS or retain set without will flag"));
    }
    if will_qos == 3 {
        return Err(malformed("will QoS 3"));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let v5 = version.is_v5();
    let properties = if v5 { r.properties(Ctx::Connect)? } else { Properties::default() };
    let client_id = r.string()?;
    let will = if will_flag {
        let wprops = if v5 { r.properties(Ctx::Will)? } else { Properties::default() };
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties: wprops })
    } else {
        None
    };
    let username = if has_username { Some(r.string()?) } else { None };
    let password = if has_password { Some(r.binary()?) } else { None };
    if r.remaining() != 0 {
        return Err(malformed("bytes left over at the end of CONNECT"));
    }
    Ok(Connect { version, clean_start: cf & 0b10 != 0, keep_alive, client_id, will, username, password, properties })
}

fn v311_connack_to_v5(code: u8) -> u8 {
    match code {
        0 => reason::SUCCESS,
        1 => reason::UNSUPPORTED_PROTOCOL_VERSION,
        2 => reason::CLIENT_IDENTIFIER_NOT_VALID,
        3 => reason::SERVER_UNAVAILABLE,
        4 => reason::BAD_USERNAME_OR_PASSWORD,
        _ => reason::NOT_AUTHORIZED,
    }
}

/// Maps an MQTT 5 CONNACK reason code onto the six 3.1.1 return codes.
pub fn v5_connack_to_v311(code: u8) -> u8 {
    match code {
        reason::SUCCESS => 0,
        reason::UNSUPPORTED_PROTOCOL_VERSION => 1,
        reason::CLIENT_IDENTIFIER_NOT_VALID => 2,
        reason::BAD_USERNAME_OR_PASSWORD => 4,
        reason::NOT_AUTHORIZED | reason::BANNED | reason::BAD_AUTHENTICATION_METHOD => 5,
        _ => 3,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_bin(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_properties(out: &mut BytesMut, p: &Properties) {
    if p.is_empty() {
        out.put_u8(0);
        return;
    }
    let body = property_bytes(p);
    put_varint(out, body.len());
    out.put_slice(&body);
}

/// The properties of `p` as they go on the wire, without their length prefix.
fn property_bytes(p: &Properties) -> BytesMut {
    let mut body = BytesMut::with_capacity(64);
    let b = &mut body;
    fn byte(b: &mut BytesMut, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u8(v);
        }
    }
    fn two(b: &mut BytesMut, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u16(v);
        }
    }
    fn four(b: &mut BytesMut, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u32(v);
        }
    }
    fn bin(b: &mut BytesMut, id: u8, v: Option<&[u8]>) {
        if let Some(v) = v {
            b.put_u8(id);
            put_bin(b, v);
        }
    }
    byte(b, 0x01, p.payload_format_indicator);
    four(b, 0x02, p.message_expiry_interval);
    bin(b, 0x03, p.content_type.as_deref().map(str::as_bytes));
    bin(b, 0x08, p.response_topic.as_deref().map(str::as_bytes));
    bin(b, 0x09, p.correlation_data.as_deref());
    for id in &p.subscription_identifiers {
        b.put_u8(0x0B);
        put_varint(b, *id as usize);
    }
    four(b, 0x11, p.session_expiry_interval);
    bin(b, 0x12, p.assigned_client_identifier.as_deref().map(str::as_bytes));
    two(b, 0x13, p.server_keep_alive);
    bin(b, 0x15, p.authentication_method.as_deref().map(str::as_bytes));
    bin(b, 0x16, p.authentication_data.as_deref());
    byte(b, 0x17, p.request_problem_information);
    four(b, 0x18, p.will_delay_interval);
    byte(b, 0x19, p.request_response_information);
    bin(b, 0x1A, p.response_information.as_deref().map(str::as_bytes));
    bin(b, 0x1C, p.server_reference.as_deref().map(str::as_bytes));
    bin(b, 0x1F, p.reason_string.as_deref().map(str::as_bytes));
    two(b, 0x21, p.receive_maximum);
    two(b, 0x22, p.topic_alias_maximum);
    two(b, 0x23, p.topic_alias);
    byte(b, 0x24, p.maximum_qos);
    byte(b, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        b.put_u8(0x26);
        put_bin(b, k.as_bytes());
        put_bin(b, v.as_bytes());
    }
    four(b, 0x27, p.maximum_packet_size);
    byte(b, 0x28, p.wildcard_subscription_available);
    byte(b, 0x29, p.subscription_identifier_available);
    byte(b, 0x2A, p.shared_subscription_available);
    body
}

/// Appends `packet` to `out` in the wire form of `version`. Returns the encoded length.
/// A PUBLISH to encode, borrowed from wherever its parts live (a shared message, say), so that a
/// delivery is written without building a [`Publish`] first.
#[derive(Clone, Copy, Debug)]
pub struct PublishRef<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: u16,
    pub properties: &'a Properties,
    pub payload: &'a [u8],
}

impl<'a> From<&'a Publish> for PublishRef<'a> {
    fn from(p: &'a Publish) -> Self {
        PublishRef {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            properties: &p.properties,
            payload: &p.payload,
        }
    }
}

/// The encoded properties of `p` (without their length) when it has any and the version
/// carries them.
fn publish_properties(p: &PublishRef<'_>, version: Version) -> Option<BytesMut> {
    (version.is_v5() && !p.properties.is_empty()).then(|| property_bytes(p.properties))
}

fn publish_remaining(p: &PublishRef<'_>, version: Version, props: &Option<BytesMut>) -> usize {
    let props_len = match props {
        Some(b) => varint_len(b.len()) + b.len(),
        None => usize::from(version.is_v5()),
    };
    2 + p.topic.len() + if p.qos > 0 { 2 } else { 0 } + props_len + p.payload.len()
}

/// Length of `p` on the wire, for Maximum Packet Size checks before sending.
pub fn publish_len(p: &PublishRef<'_>, version: Version) -> usize {
    let n = publish_remaining(p, version, &publish_properties(p, version));
    1 + varint_len(n) + n
}

/// Encodes a PUBLISH straight into `out`: the path every delivery takes.
pub fn encode_publish(p: &PublishRef<'_>, version: Version, out: &mut BytesMut) -> usize {
    let props = publish_properties(p, version);
    let remaining = publish_remaining(p, version, &props);
    let start = out.len();
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(0x30 | (p.dup as u8) << 3 | p.qos << 1 | p.retain as u8);
    put_varint(out, remaining);
    put_bin(out, p.topic.as_bytes());
    if p.qos > 0 {
        out.put_u16(p.packet_id);
    }
    match props {
        Some(b) => {
            put_varint(out, b.len());
            out.put_slice(&b);
        }
        None if version.is_v5() => out.put_u8(0),
        None => {}
    }
    out.put_slice(p.payload);
    out.len() - start
}

pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) -> usize {
    let v5 = version.is_v5();
    match packet {
        Packet::Publish(p) => return encode_publish(&p.into(), version, out),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r)
            if !v5 || (r.code == reason::SUCCESS && r.properties.is_empty()) =>
        {
            let first = match packet {
                Packet::PubAck(_) => 0x40,
                Packet::PubRec(_) => 0x50,
                Packet::PubRel(_) => 0x62,
                _ => 0x70,
            };
            out.reserve(4);
            out.put_u8(first);
            out.put_u8(2);
            out.put_u16(r.packet_id);
            return 4;
        }
        _ => {}
    }
    let mut body = BytesMut::with_capacity(64);
    let start = out.len();
    let (first, payload): (u8, &[u8]) = match packet {
        Packet::Connect(c) => {
            put_bin(&mut body, b"MQTT");
            body.put_u8(if c.version.is_v5() { 5 } else { 4 });
            let mut cf = 0u8;
            if c.clean_start {
                cf |= 0b10;
            }
            if let Some(w) = &c.will {
                cf |= 0b100 | (w.qos << 3);
                if w.retain {
                    cf |= 0b10_0000;
                }
            }
            if c.password.is_some() {
                cf |= 0b100_0000;
            }
            if c.username.is_some() {
                cf |= 0b1000_0000;
            }
            body.put_u8(cf);
            body.put_u16(c.keep_alive);
            if c.version.is_v5() {
                put_properties(&mut body, &c.properties);
            }
            put_bin(&mut body, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                if c.version.is_v5() {
                    put_properties(&mut body, &w.properties);
                }
                put_bin(&mut body, w.topic.as_bytes());
                put_bin(&mut body, &w.payload);
            }
            if let Some(u) = &c.username {
                put_bin(&mut body, u.as_bytes());
            }
            if let Some(p) = &c.password {
                put_bin(&mut body, p);
            }
            (0x10, &[])
        }
        Packet::ConnAck(a) => {
            body.put_u8(a.session_present as u8);
            if v5 {
                body.put_u8(a.code);
                put_properties(&mut body, &a.properties);
            } else {
                body.put_u8(v5_connack_to_v311(a.code));
            }
            (0x20, &[])
        }
        Packet::Publish(p) => return encode_publish(&p.into(), version, out),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            body.put_u16(r.packet_id);
            if v5 && (r.code != reason::SUCCESS || !r.properties.is_empty()) {
                body.put_u8(r.code);
                if !r.properties.is_empty() {
                    put_properties(&mut body, &r.properties);
                }
            }
            let first = match packet {
                Packet::PubAck(_) => 0x40,
                Packet::PubRec(_) => 0x50,
                Packet::PubRel(_) => 0x62,
                _ => 0x70,
            };
            (first, &[])
        }
        Packet::Subscribe(s) => {
            body.put_u16(s.packet_id);
            if v5 {
                put_properties(&mut body, &s.properties);
            }
            for (f, o) in &s.filters {
                put_bin(&mut body, f.as_bytes());
                let mut b = o.qos;
                if v5 {
                    b |= (o.no_local as u8) << 2 | (o.retain_as_published as u8) << 3 | o.retain_handling << 4;
                }
                body.put_u8(b);
            }
            (0x82, &[])
        }
        Packet::SubAck(s) => {
            body.put_u16(s.packet_id);
            if v5 {
                put_properties(&mut body, &s.properties);
                body.put_slice(&s.codes);
            } else {
                // 3.1.1 knows only granted QoS 0..=2 and failure 0x80.
                for &c in &s.codes {
                    body.put_u8(if c <= 2 { c } else { 0x80 });
                }
            }
            (0x90, &[])
        }
        Packet::Unsubscribe(u) => {
            body.put_u16(u.packet_id);
            if v5 {
                put_properties(&mut body, &u.properties);
            }
            for f in &u.filters {
                put_bin(&mut body, f.as_bytes());
            }
            (0xA2, &[])
        }
        Packet::UnsubAck(u) => {
            body.put_u16(u.packet_id);
            if v5 {
                put_properties(&mut body, &u.properties);
                body.put_slice(&u.codes);
            }
            (0xB0, &[])
        }
        Packet::PingReq => (0xC0, &[]),
        Packet::PingResp => (0xD0, &[]),
        Packet::Disconnect(d) => {
            if v5 && (d.code != reason::SUCCESS || !d.properties.is_empty()) {
                body.put_u8(d.code);
                if !d.properties.is_empty() {
                    put_properties(&mut body, &d.properties);
                }
            }
            (0xE0, &[])
        }
        Packet::Auth(a) => {
            if a.code != reason::SUCCESS || !a.properties.is_empty() {
                body.put_u8(a.code);
                put_properties(&mut body, &a.properties);
            }
            (0xF0, &[])
        }
    };
    let remaining = body.len() + payload.len();
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(first);
    put_varint(out, remaining);
    out.put_slice(&body);
    out.put_slice(payload);
    out.len() - start
}

/// Length `packet` would have on the wire, for Maximum Packet Size checks before sending.
pub fn encoded_len(packet: &Packet, version: Version) -> usize {
    if let Packet::Publish(p) = packet {
        return publish_len(&p.into(), version);
    }
    let mut b = BytesMut::new();
    encode(packet, version, &mut b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(p: Packet, v: Version) {
        let mut b = BytesMut::new();
        let n = encode(&p, v, &mut b);
        assert_eq!(n, b.len());
        assert_eq!(encoded_len(&p, v), n);
        let ver = if matches!(p, Packet::Connect(_)) { None } else { Some(v) };
        let got = decode(&mut b, ver, usize::MAX).unwrap().unwrap();
        assert_eq!(got, p);
        assert!(b.is_empty());
    }

    #[test]
    fn incomplete_is_not_yet() {
        let mut b = BytesMut::new();
        encode(&Packet::PingReq, Version::V311, &mut b);
        let mut half = BytesMut::from(&b[..1]);
        assert_eq!(decode(&mut half, Some(Version::V311), 100), Ok(None));
        assert_eq!(half.len(), 1);
    }

    #[test]
    fn an_announced_length_reserves_nothing() {
        // A CONNECT announcing 1 MiB, ten bytes of it here: the buffer stays as small as it was.
        let mut b = BytesMut::with_capacity(16);
        b.extend_from_slice(&[0x10, 0xFC, 0xFF, 0x3F, 0, 4, b'M', b'Q', b'T', b'T']);
        assert_eq!(decode(&mut b, None, 1 << 20), Ok(None));
        assert_eq!(b.capacity(), 16);
    }

    #[test]
    fn too_large_is_refused_from_header() {
        let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x03][..]);
        let e = decode(&mut b, Some(Version::V5), 1024).unwrap_err();
        assert_eq!(e.code, reason::PACKET_TOO_LARGE);
    }

    #[test]
    fn bad_flags_and_lengths_are_malformed() {
        for raw in [
            &[0x36u8, 0x00][..],                   // PUBLISH QoS 3
            &[0x80, 0x02, 0x00, 0x01],             // SUBSCRIBE with wrong flags
            &[0xC0, 0x01, 0x00],                   // PINGREQ with body
            &[0x30, 0x03, 0x00, 0x05, b'a'],       // string length past end
            &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], // 5-byte varint
        ] {
            let mut b = BytesMut::from(raw);
            let e = decode(&mut b, Some(Version::V5), 1 << 20).unwrap_err();
            assert_eq!(e.code, reason::MALFORMED_PACKET, "{raw:?}");
        }
    }

    #[test]
    fn first_packet_must_be_connect() {
        let mut b = BytesMut::from(&[0xC0u8, 0x00][..]);
        assert_eq!(decode(&mut b, None, 100).unwrap_err().code, reason::PROTOCOL_ERROR);
    }

    #[test]
    fn v311_connack_codes_map_both_ways() {
        for c in 0..=5u8 {
            assert_eq!(v5_connack_to_v311(v311_connack_to_v5(c)), c);
        }
    }

    mod prop {
        use super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;

        fn s() -> impl Strategy<Value = String> {
            "[a-z0-9/]{0,12}"
        }
        fn bin() -> impl Strategy<Value = Bytes> {
            vec(any::<u8>(), 0..24).prop_map(Bytes::from)
        }
        fn user() -> impl Strategy<Value = Vec<(String, String)>> {
            vec((s(), s()), 0..3)
        }
        fn publish_props() -> impl Strategy<Value = Properties> {
            (
                option::of(0..=1u8),
                option::of(any::<u32>()),
                option::of(s()),
                option::of(s()),
                option::of(bin()),
                vec(1..=268_435_455u32, 0..3),
                option::of(1..=u16::MAX),
                user(),
            )
                .prop_map(|(pfi, exp, ct, rt, cd, sids, alias, up)| Properties {
                    payload_format_indicator: pfi,
                    message_expiry_interval: exp,
                    content_type: ct,
                    response_topic: rt,
                    correlation_data: cd,
                    subscription_identifiers: sids,
                    topic_alias: alias,
                    user_properties: up,
                    ..Default::default()
                })
        }
        fn resp_props() -> impl Strategy<Value = Properties> {
            (option::of(s()), user()).prop_map(|(rs, up)| Properties {
                reason_string: rs,
                user_properties: up,
                ..Default::default()
            })
        }
        fn pid() -> impl Strategy<Value = u16> {
            1..=u16::MAX
        }
        fn ver() -> impl Strategy<Value = Version> {
            prop_oneof![Just(Version::V311), Just(Version::V5)]
        }

        fn packet(v: Version) -> impl Strategy<Value = Packet> {
            let v5 = v.is_v5();
            let props = move |p: Properties| if v5 { p } else { Properties::default() };
            let code = move |c: u8| if v5 { c } else { 0 };
            let connect = (
                any::<bool>(),
                any::<u16>(),
                s(),
                option::of((s(), bin(), 0..=2u8, any::<bool>(), option::of(any::<u32>()))),
                option::of(s()),
                option::of(bin()),
                option::of(any::<u32>()),
                option::of(1..=u16::MAX),
            )
                .prop_map(move |(clean, ka, id, will, user, pass, sei, rm)| {
                    let pass = if v5 || user.is_some() { pass } else { None };
                    Packet::Connect(Box::new(Connect {
                        version: v,
                        clean_start: clean,
                        keep_alive: ka,
                        client_id: id,
                        will: will.map(|(topic, payload, qos, retain, wd)| Will {
                            topic,
                            payload,
                            qos,
                            retain,
                            properties: props(Properties { will_delay_interval: wd, ..Default::default() }),
                        }),
                        username: user,
                        password: pass,
                        properties: props(Properties {
                            session_expiry_interval: sei,
                            receive_maximum: rm,
                            ..Default::default()
                        }),
                    }))
                });
            let connack =
                (any::<bool>(), prop_oneof![Just(0u8), Just(0x85u8), Just(0x86u8), Just(0x87u8)], option::of(s()))
                    .prop_map(move |(sp, c, aci)| {
                        Packet::ConnAck(ConnAck {
                            session_present: sp,
                            code: c,
                            properties: props(Properties { assigned_client_identifier: aci, ..Default::default() }),
                        })
                    });
            let publish = (0..=2u8, any::<bool>(), any::<bool>(), "[a-z/]{1,12}", pid(), publish_props(), bin())
                .prop_map(move |(qos, dup, retain, topic, id, p, payload)| {
                    Packet::Publish(Publish {
                        dup: dup && qos > 0,
                        qos,
                        retain,
                        topic,
                        packet_id: if qos > 0 { id } else { 0 },
                        properties: props(p).into(),
                        payload,
                    })
                });
            let resp = (0..4u8, pid(), prop_oneof![Just(0u8), Just(0x10u8), Just(0x80u8)], resp_props()).prop_map(
                move |(k, id, c, p)| {
                    let r = PubResp { packet_id: id, code: code(c), properties: props(p) };
                    match k {
                        0 => Packet::PubAck(r),
                        1 => Packet::PubRec(r),
                        2 => Packet::PubRel(r),
                        _ => Packet::PubComp(r),
                    }
                },
            );
            let subscribe = (
                pid(),
                vec(("[a-z/+#]{1,10}", 0..=2u8, any::<bool>(), any::<bool>(), 0..=2u8), 1..4),
                option::of(1..=1000u32),
            )
                .prop_map(move |(id, fs, sid)| {
                    Packet::Subscribe(Subscribe {
                        packet_id: id,
                        filters: fs
                            .into_iter()
                            .map(|(f, q, nl, rap, rh)| {
                                let o = if v5 {
                                    SubOptions { qos: q, no_local: nl, retain_as_published: rap, retain_handling: rh }
                                } else {
                                    SubOptions { qos: q, ..Default::default() }
                                };
                                (f, o)
                            })
                            .collect(),
                        properties: props(Properties {
                            subscription_identifiers: sid.into_iter().collect(),
                            ..Default::default()
                        }),
                    })
                });
            let suback = (pid(), vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 1..4), resp_props())
                .prop_map(move |(id, codes, p)| Packet::SubAck(SubAck { packet_id: id, codes, properties: props(p) }));
            let unsub = (pid(), vec("[a-z/]{1,8}", 1..4), user()).prop_map(move |(id, filters, up)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id: id,
                    filters,
                    properties: props(Properties { user_properties: up, ..Default::default() }),
                })
            });
            let unsuback =
                (pid(), vec(prop_oneof![Just(0u8), Just(0x11)], 1..4), resp_props()).prop_map(move |(id, codes, p)| {
                    Packet::UnsubAck(UnsubAck {
                        packet_id: id,
                        codes: if v5 { codes } else { Vec::new() },
                        properties: props(p),
                    })
                });
            let disconnect = (prop_oneof![Just(0u8), Just(4), Just(0x8E)], option::of(any::<u32>()), option::of(s()))
                .prop_map(move |(c, sei, rs)| {
                    Packet::Disconnect(Disconnect {
                        code: code(c),
                        properties: props(Properties {
                            session_expiry_interval: sei,
                            reason_string: rs,
                            ..Default::default()
                        }),
                    })
                });
            let auth =
                (prop_oneof![Just(0u8), Just(0x18)], option::of(s()), option::of(bin())).prop_map(|(c, m, d)| {
                    Packet::Auth(Auth {
                        code: c,
                        properties: Properties {
                            authentication_method: m,
                            authentication_data: d,
                            ..Default::default()
                        },
                    })
                });
            let mut all = vec![
                connect.boxed(),
                connack.boxed(),
                publish.boxed(),
                resp.boxed(),
                subscribe.boxed(),
                suback.boxed(),
                unsub.boxed(),
                unsuback.boxed(),
                Just(Packet::PingReq).boxed(),
                Just(Packet::PingResp).boxed(),
                disconnect.boxed(),
            ];
            if v5 {
                all.push(auth.boxed());
            }
            proptest::strategy::Union::new(all)
        }

        proptest! {
            #[test]
            fn every_packet_round_trips((v, p) in ver().prop_flat_map(|v| (Just(v), packet(v)))) {
                roundtrip(p, v);
            }

            #[test]
            fn decode_never_panics(raw in vec(any::<u8>(), 0..64), v5 in any::<bool>(), pre in any::<bool>()) {
                let mut b = BytesMut::from(&raw[..]);
                let v = if pre { None } else if v5 { Some(Version::V5) } else { Some(Version::V311) };
                let _ = decode(&mut b, v, 1 << 16);
            }

            /// `decode_publish` is `decode` of a PUBLISH: same packet, same error, same bytes left.
            #[test]
            fn decode_publish_is_decode(flags in 0..16u8, body in vec(any::<u8>(), 0..40), more in vec(any::<u8>(), 0..8), v5 in any::<bool>(), max in 2..48usize) {
                let v = if v5 { Version::V5 } else { Version::V311 };
                let mut raw = vec![0x30 | flags, body.len() as u8];
                raw.extend_from_slice(&body);
                raw.extend_from_slice(&more);
                let (mut a, mut b) = (BytesMut::from(&raw[..]), BytesMut::from(&raw[..]));
                let general = decode(&mut a, Some(v), max).map(|p| p.map(|p| match p {
                    Packet::Publish(p) => p,
                    other => panic!("not a PUBLISH: {other:?}"),
                }));
                prop_assert_eq!(decode_publish(&mut b, v, max), general);
                prop_assert_eq!(a, b);
            }
        }
    }
}
