//! WebSocket (RFC 6455) for `ws` and `wss` listeners, sans-I/O: the HTTP/1.1 upgrade, then
//! frames in, MQTT bytes out, and MQTT bytes in, binary frames out.
//!
//! What MQTT over WebSocket needs (MQTT 5 §6) and no more: the upgrade must name the listener's
//! path and offer the subprotocol `mqtt` (answered `mqtt`; otherwise refused with a 4xx and the
//! reason); client frames must be masked and binary (continuations of a fragmented message
//! included); the payloads are one byte stream, so an MQTT packet may span frames and a frame
//! may hold several packets; ping is answered with pong, close with close (then the connection
//! ends). Text frames, unmasked frames, reserved bits and opcodes are protocol errors: a close
//! frame with the RFC's code, then the end.
//!
//! Bounds: the upgrade request at most [`UPGRADE_MAX`] bytes (then 431); a data frame at most
//! the MQTT maximum packet size (then close 1009); a control frame 125 bytes (the RFC's). The
//! time the upgrade may take is the connection's CONNECT deadline, which counts from accept.
//! State between calls: a partial frame header (at most 14 bytes, inline) and, during the
//! upgrade, the request so far; payload bytes are unmasked straight into the MQTT input.

use bytes::{BufMut, BytesMut};

/// Largest upgrade request (request line and headers).
pub(crate) const UPGRADE_MAX: usize = 8 * 1024;
/// RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why the connection ends (for the log); what the peer is told went to the reply already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End(pub(crate) &'static str);

pub(crate) struct Ws {
    /// The upgrade request so far; `None` once upgraded.
    request: Option<Vec<u8>>,
    /// Bytes of the frame header read so far.
    header: [u8; 14],
    header_len: u8,
    /// Payload bytes left in the current frame, its mask and how far into it we are.
    remaining: u64,
    mask: [u8; 4],
    mask_at: u8,
    /// The current frame's opcode (a control frame's payload is collected in `control`).
    opcode: u8,
    fin: bool,
    /// A fragmented binary message is open: continuations may follow.
    in_message: bool,
    control: Vec<u8>,
}

/// The outcome of a complete header, or why the frame is refused.
enum Header {
    Need,
    Done { opcode: u8, fin: bool, len: u64, mask: [u8; 4], size: usize },
}

impl Ws {
    pub(crate) fn new() -> Ws {
        Ws {
            request: Some(Vec::new()),
            header: [0; 14],
            header_len: 0,
            remaining: 0,
            mask: [0; 4],
            mask_at: 0,
            opcode: 0,
            fin: true,
            in_message: false,
            control: Vec::new(),
        }
    }

    pub(crate) fn upgraded(&self) -> bool {
        self.request.is_none()
    }

    /// Takes bytes from the peer: MQTT bytes go to `mqtt`, what the peer must be sent (the
    /// upgrade answer, pongs, a close frame, a refusal) to `reply`. `path` is the listener's;
    /// `max_frame` the largest data frame payload accepted.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        path: &str,
        max_frame: usize,
        mqtt: &mut BytesMut,
        reply: &mut BytesMut,
    ) -> Result<(), End> {
        if let Some(req) = &mut self.request {
            // Look for the end of the headers in what is new (and the 3 bytes before it).
            let from = req.len().saturating_sub(3);
            let room = UPGRADE_MAX - req.len();
            req.extend_from_slice(&input[..input.len().min(room)]);
            let Some(end) = find(&req[from..], b"\r\n\r\n").map(|i| from + i + 4) else {
                if req.len() >= UPGRADE_MAX {
                    return Err(refuse(reply, 431, "upgrade request too large"));
                }
                return Ok(());
            };
            // Bytes after the request are frames already (the client did not wait for 101).
            let consumed_before = req.len() - input.len().min(room);
            let after = end - consumed_before;
            let req = self.request.take().unwrap_or_default();
            upgrade(&req[..end], path, reply)?;
            input = &input[after.min(input.len())..];
        }
        while !input.is_empty() {
            if self.remaining == 0 && self.header_len == 0 || self.header_len > 0 {
                // Between frames, or in a header: collect it.
                let take = self.header_needs(input);
                let (h, rest) = input.split_at(take);
                self.header[self.header_len as usize..][..take].copy_from_slice(h);
                self.header_len += take as u8;
                input = rest;
                match parse_header(&self.header[..self.header_len as usize]) {
                    Header::Need => continue,
                    Header::Done { opcode, fin, len, mask, size } => {
                        debug_assert_eq!(size, self.header_len as usize);
                        self.header_len = 0;
                        self.start_frame(opcode, fin, len, mask, max_frame, reply)?;
                        if len == 0 {
                            self.end_frame(reply)?;
                        }
                        continue;
                    }
                }
            }
            let n = input.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            let (payload, rest) = input.split_at(n);
            input = rest;
            let control = self.opcode >= 8;
            let mut at = self.mask_at as usize;
            if control {
                self.control.extend(payload.iter().map(|b| {
                    at += 1;
                    b ^ self.mask[(at - 1) & 3]
                }));
            } else {
                mqtt.reserve(n);
                for &b in payload {
                    mqtt.put_u8(b ^ self.mask[at & 3]);
                    at += 1;
                }
            }
            self.mask_at = (at & 3) as u8;
            self.remaining -= n as u64;
            if self.remaining == 0 {
                self.end_frame(reply)?;
            }
        }
        Ok(())
    }

    /// How many of `input`'s bytes belong to the header being collected.
    fn header_needs(&self, input: &[u8]) -> usize {
        let have = self.header_len as usize;
        let mut h = [0u8; 2];
        let known = have.min(2);
        h[..known].copy_from_slice(&self.header[..known]);
        for (i, b) in input.iter().take(2 - known).enumerate() {
            h[known + i] = *b;
        }
        let need = if have + input.len() < 2 { 2 } else { header_size(h[1]) };
        (need - have).min(input.len())
    }

    fn start_frame(
        &mut self,
        opcode: u8,
        fin: bool,
        len: u64,
        mask: [u8; 4],
        max_frame: usize,
        reply: &mut BytesMut,
    ) -> Result<(), End> {
        let Some(mask) = Some(mask).filter(|_| self.header[1] & 0x80 != 0) else {
            return Err(close(reply, 1002, "client frames must be masked"));
        };
        if self.header[0] & 0x70 != 0 {
            return Err(close(reply, 1002, "reserved bits set"));
        }
        match opcode {
            0 if !self.in_message => return Err(close(reply, 1002, "continuation without a message")),
            2 if self.in_message => return Err(close(reply, 1002, "new message inside a fragmented one")),
            0 | 2 if len > max_frame as u64 => {
                return Err(close(reply, 1009, "frame larger than the maximum packet size"))
            }
            0 | 2 => self.in_message = !fin,
            1 => return Err(close(reply, 1003, "MQTT over WebSocket uses binary frames")),
            8..=10 if !fin || len > 125 => return Err(close(reply, 1002, "bad control frame")),
            8..=10 => self.control.clear(),
            _ => return Err(close(reply, 1002, "unknown opcode")),
        }
        self.opcode = opcode;
        self.fin = fin;
        self.remaining = len;
        self.mask = mask;
        self.mask_at = 0;
        Ok(())
    }

    /// A frame's payload is complete.
    fn end_frame(&mut self, reply: &mut BytesMut) -> Result<(), End> {
        match self.opcode {
            9 => frame(0xA, &self.control, reply),
            8 => {
                // Echo the status code (RFC 6455 §5.5.1), then the connection ends.
                let code = self.control.get(..2).map_or(1000, |c| u16::from_be_bytes([c[0], c[1]]));
                frame(0x8, &code.to_be_bytes(), reply);
                self.control = Vec::new();
                return Err(End("WebSocket close"));
            }
            _ => {}
        }
        if self.opcode >= 8 {
            self.control = Vec::new();
        }
        Ok(())
    }
}

/// Appends `payload` to `out` as one binary frame (server frames are not masked).
pub(crate) fn binary(payload: &[u8], out: &mut BytesMut) {
    frame(0x2, payload, out)
}

fn frame(opcode: u8, payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xffff => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
}

/// The header's size from its second byte: 2, the extended length, the masking key.
fn header_size(b1: u8) -> usize {
    let len_bytes = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + len_bytes + mask_size(b1)
}

fn mask_size(b1: u8) -> usize {
    if b1 & 0x80 != 0 {
        4
    } else {
        0
    }
}

fn parse_header(h: &[u8]) -> Header {
    if h.len() < 2 {
        return Header::Need;
    }
    let size = header_size(h[1]);
    if h.len() < size {
        return Header::Need;
    }
    let len = match h[1] & 0x7f {
        n @ 0..=125 => u64::from(n),
        _ => h[2..size - mask_size(h[1])].iter().fold(0u64, |a, &b| a << 8 | u64::from(b)),
    };
    // An unmasked frame has no key: refused by `start_frame` from its first two bytes.
    let mut mask = [0; 4];
    mask[..mask_size(h[1])].copy_from_slice(&h[size - mask_size(h[1])..size]);
    Header::Done { opcode: h[0] & 0x0f, fin: h[0] & 0x80 != 0, len, mask, size }
}

/// Checks the upgrade request and writes the 101 answer, or the refusal.
fn upgrade(req: &[u8], path: &str, reply: &mut BytesMut) -> Result<(), End> {
    let Ok(text) = std::str::from_utf8(req) else { return Err(refuse(reply, 400, "request is not UTF-8")) };
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target, version) = (first.next(), first.next(), first.next());
    if method != Some("GET") || version != Some("HTTP/1.1") {
        return Err(refuse(reply, 400, "expected GET ... HTTP/1.1"));
    }
    let target = target.unwrap_or("");
    if target.split('?').next() != Some(path) {
        return Err(refuse(reply, 404, "no MQTT endpoint at this path"));
    }
    let (mut upgrade_ws, mut connection_upgrade, mut version13, mut key, mut mqtt) = (false, false, false, None, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(reply, 400, "malformed header line"));
        };
        let value = value.trim();
        let tokens = || value.split(',').map(str::trim);
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade_ws |= tokens().any(|t| t.eq_ignore_ascii_case("websocket")),
            "connection" => connection_upgrade |= tokens().any(|t| t.eq_ignore_ascii_case("upgrade")),
            "sec-websocket-version" => version13 = value == "13",
            "sec-websocket-key" => key = Some(value),
            "sec-websocket-protocol" => mqtt |= tokens().any(|t| t == "mqtt"),
            _ => {}
        }
    }
    if !upgrade_ws || !connection_upgrade {
        return Err(refuse(reply, 400, "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)"));
    }
    if !version13 {
        return Err(refuse(reply, 400, "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(refuse(reply, 400, "Sec-WebSocket-Key missing"));
    };
    if !mqtt {
        return Err(refuse(reply, 400, "Sec-WebSocket-Protocol must offer mqtt"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}{GUID}").as_bytes());
    let accept = base64(digest.as_ref());
    reply.extend_from_slice(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
        .as_bytes(),
    );
    Ok(())
}

fn refuse(reply: &mut BytesMut, status: u16, why: &'static str) -> End {
    let reason = match status {
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    reply.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}\n",
            why.len() + 1
        )
        .as_bytes(),
    );
    End(why)
}

fn close(reply: &mut BytesMut, code: u16, why: &'static str) -> End {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(why.as_bytes());
    frame(0x8, &payload, reply);
    End(why)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = u32::from(c[0]) << 16 | u32::from(*c.get(1).unwrap_or(&0)) << 8 | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    /// A client frame: masked with a fixed key.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    fn open() -> Ws {
        let mut ws = Ws::new();
        let (mut mqtt, mut reply) = (BytesMut::new(), BytesMut::new());
        ws.feed(REQ.as_bytes(), "/mqtt", 1 << 20, &mut mqtt, &mut reply).unwrap();
        assert!(ws.upgraded());
        ws
    }

    /// Feeds `bytes` in pieces of `step`, collecting MQTT bytes and the reply.
    fn feed_in(ws: &mut Ws, bytes: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, Result<(), End>) {
        let (mut mqtt, mut reply) = (BytesMut::new(), BytesMut::new());
        for piece in bytes.chunks(step) {
            if let Err(e) = ws.feed(piece, "/mqtt", 1 << 20, &mut mqtt, &mut reply) {
                return (mqtt.to_vec(), reply.to_vec(), Err(e));
            }
        }
        (mqtt.to_vec(), reply.to_vec(), Ok(()))
    }

    #[test]
    fn the_upgrade_answers_with_the_rfc_accept_key_and_mqtt() {
        let mut ws = Ws::new();
        let (mut mqtt, mut reply) = (BytesMut::new(), BytesMut::new());
        // Byte by byte, with a frame right behind the request.
        let mut bytes = REQ.as_bytes().to_vec();
        bytes.extend(client_frame(true, 2, &[0xc0, 0x00]));
        for b in &bytes {
            ws.feed(std::slice::from_ref(b), "/mqtt", 1 << 20, &mut mqtt, &mut reply).unwrap();
        }
        let reply = String::from_utf8(reply.to_vec()).unwrap();
        assert!(reply.starts_with("HTTP/1.1 101 "), "{reply}");
        // The RFC 6455 §1.3 example.
        assert!(reply.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{reply}");
        assert!(reply.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{reply}");
        assert_eq!(&mqtt[..], &[0xc0, 0x00]);
    }

    #[test]
    fn upgrades_without_mqtt_on_another_path_or_too_large_are_refused() {
        let refused = |req: &str| {
            let mut ws = Ws::new();
            let (mut mqtt, mut reply) = (BytesMut::new(), BytesMut::new());
            let e = ws.feed(req.as_bytes(), "/mqtt", 1 << 20, &mut mqtt, &mut reply).unwrap_err();
            (String::from_utf8(reply.to_vec()).unwrap(), e)
        };
        let (r, e) = refused(&REQ.replace("mqttv3.1, mqtt", "chat"));
        assert!(r.starts_with("HTTP/1.1 400 ") && r.ends_with("Sec-WebSocket-Protocol must offer mqtt\n"), "{r}");
        assert_eq!(e, End("Sec-WebSocket-Protocol must offer mqtt"));
        let (r, _) = refused(&REQ.replace("/mqtt", "/other"));
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let (r, _) = refused(&REQ.replace("Upgrade: websocket\r\n", ""));
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let huge = format!("GET /mqtt HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(UPGRADE_MAX));
        let (r, _) = refused(&huge);
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }

    #[test]
    fn one_byte_stream_across_fragmented_and_combined_frames() {
        // Two packets in one frame, then one packet over three fragments (the last with a
        // 16-bit length), a ping in between.
        let connect_like: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut bytes = client_frame(true, 2, &[0xc0, 0x00, 0xe0, 0x00]);
        bytes.extend(client_frame(false, 2, &connect_like[..10]));
        bytes.extend(client_frame(true, 9, b"hi"));
        bytes.extend(client_frame(false, 0, &connect_like[10..20]));
        bytes.extend(client_frame(true, 0, &connect_like[20..]));
        let mut want = vec![0xc0, 0x00, 0xe0, 0x00];
        want.extend_from_slice(&connect_like);
        for step in [1, 3, 7, bytes.len()] {
            let mut ws = open();
            let (mqtt, reply, r) = feed_in(&mut ws, &bytes, step);
            r.unwrap();
            assert_eq!(mqtt, want, "step {step}");
            assert_eq!(reply, [0x8a, 2, b'h', b'i'], "pong, step {step}");
        }
    }

    #[test]
    fn bad_frames_are_closed_with_the_rfc_code() {
        let code = |bytes: Vec<u8>| {
            let (_, reply, r) = feed_in(&mut open(), &bytes, 5);
            assert!(r.is_err());
            assert_eq!(reply[0], 0x88, "a close frame");
            u16::from_be_bytes([reply[2], reply[3]])
        };
        // Unmasked.
        assert_eq!(code(vec![0x82, 0x02, 0xc0, 0x00]), 1002);
        // Text.
        assert_eq!(code(client_frame(true, 1, b"{}")), 1003);
        // Oversized: larger than the maximum packet size (announced, nothing buffered).
        let mut big = vec![0x82, 0x80 | 127];
        big.extend_from_slice(&(2u64 << 20).to_be_bytes());
        big.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(code(big), 1009);
        // A continuation with no message open.
        assert_eq!(code(client_frame(true, 0, b"x")), 1002);
        // The peer closes: its code is echoed.
        assert_eq!(code(client_frame(true, 8, &1001u16.to_be_bytes())), 1001);
    }

    #[test]
    fn server_frames_are_binary_and_unmasked() {
        let mut out = BytesMut::new();
        binary(&[1, 2, 3], &mut out);
        assert_eq!(&out[..], &[0x82, 3, 1, 2, 3]);
        let mut out = BytesMut::new();
        binary(&[0; 300], &mut out);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
