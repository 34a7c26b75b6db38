//! What a `tls`, `ws` or `wss` connection puts between its socket and the state machine: the
//! driver hands it the socket's bytes and gets MQTT bytes back, hands it MQTT bytes and gets
//! the socket's bytes. The state machine never learns the kind of a connection.
//!
//! Plain TCP connections have no `Transport` (the driver's fast path: no copy, no allocation).
//! TLS is rustls's `ServerConnection`, driven without I/O of its own: ciphertext in through
//! `read_tls` from the core's scratch buffer, plaintext out through its reader, and output
//! encrypted into rustls's send buffer, which the driver writes to the socket. WebSocket is
//! `ws::Ws`, on the plaintext.
//!
//! Bounds: TLS input is bounded by rustls (a handshake message at most 64 KiB, a record at most
//! 16 KiB plus overhead); the WebSocket upgrade by `ws::UPGRADE_MAX` and frames by the maximum
//! packet size. Output: the driver takes the state machine's next output only once everything
//! before it went to the kernel, so the transport holds at most one output chunk (itself bounded
//! by `max_outbound_buffer_bytes`), encrypted or framed, plus control replies (pongs, closes,
//! handshake messages). Time: a connection is accepted into the state machine at once, so the
//! TLS handshake and the WebSocket upgrade count against its CONNECT deadline. Memory before
//! CONNECT: every socket byte a transport takes in until the state machine has the CONNECT —
//! TLS records, the upgrade request, frames — is reported to it
//! ([`Shard::on_transport_input`](sluice_core::shard::Shard::on_transport_input)) and counts
//! against the shard's pre-CONNECT budget beside the partial CONNECT's own buffer. Counted as
//! received: rustls does not say how much of it it keeps, and what arrived bounds that.

use std::io::{BufRead, ErrorKind, Write};
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, BytesMut};

use crate::tls::{certificate_identity, TlsAcceptor};
use crate::ws::{self, End, Ws};

/// How one listener's connections are carried (shared by its connections on a core).
pub(crate) struct Wrapping {
    /// The listener's index among the configured ones.
    pub(crate) index: u16,
    pub(crate) tls: Option<Arc<TlsAcceptor>>,
    /// ws/wss: the upgrade's path.
    pub(crate) ws_path: Option<Box<str>>,
    pub(crate) identity_as_username: bool,
    pub(crate) max_frame: usize,
}

pub(crate) struct Transport {
    tls: Option<rustls::ServerConnection>,
    ws: Option<Ws>,
    wrapping: Rc<Wrapping>,
    /// Socket bytes waiting for the kernel (without TLS; with it, rustls holds them).
    raw_out: BytesMut,
    /// The transport ended (refusal, protocol error, the peer's close): write what is queued,
    /// then close; nothing more goes in or out.
    ended: bool,
    /// The handshake finished and the state machine heard who this is.
    established: bool,
    /// Socket bytes taken in while the state machine waits for the CONNECT; `None` once it has
    /// it (nothing is counted after).
    before_connect: Option<usize>,
}

/// What a read did beyond MQTT bytes.
pub(crate) enum Event {
    Nothing,
    /// The TLS handshake (and, for wss, nothing else yet) just completed: the identity the
    /// client certificate proved, when the listener uses it.
    Established(Option<Box<str>>),
}

impl Transport {
    pub(crate) fn new(wrapping: &Rc<Wrapping>) -> Transport {
        let tls = wrapping.tls.as_ref().map(|a| rustls::ServerConnection::new(a.config()));
        let tls = match tls {
            Some(Ok(mut c)) => {
                // The driver hands over one output chunk at a time, only once the previous one
                // is in the kernel: that is the bound, not rustls's own limit.
                c.set_buffer_limit(None);
                Some(c)
            }
            Some(Err(e)) => {
                // Only a configuration rustls itself built and checked gets here.
                tracing::warn!(error = %e, "cannot start a TLS connection");
                None
            }
            None => None,
        };
        let ended = wrapping.tls.is_some() && tls.is_none();
        Transport {
            tls,
            ws: wrapping.ws_path.is_some().then(Ws::new),
            wrapping: wrapping.clone(),
            raw_out: BytesMut::new(),
            ended,
            established: false,
            before_connect: Some(0),
        }
    }

    /// Socket bytes taken in so far while the CONNECT is awaited (`None`: no longer counted).
    pub(crate) fn bytes_before_connect(&self) -> Option<usize> {
        self.before_connect
    }

    /// The state machine has the CONNECT (or no longer tracks the connection): stop counting.
    pub(crate) fn connect_done(&mut self) {
        self.before_connect = None;
    }

    pub(crate) fn listener(&self) -> u16 {
        self.wrapping.index
    }

    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Bytes from the socket: MQTT bytes are appended to `mqtt`. An error ends the connection
    /// (what the peer should hear — an alert, a 4xx, a close frame — is queued).
    pub(crate) fn input(&mut self, raw: &[u8], mqtt: &mut BytesMut) -> Result<Event, End> {
        if self.ended {
            return Ok(Event::Nothing);
        }
        if let Some(n) = &mut self.before_connect {
            *n = n.saturating_add(raw.len());
        }
        let mut event = Event::Nothing;
        if self.tls.is_none() {
            return self.feed_ws(raw, mqtt).map(|()| Event::Nothing);
        }
        let mut reply = BytesMut::new();
        let r = self.input_tls(raw, mqtt, &mut reply, &mut event);
        if !reply.is_empty() {
            self.send_raw(&reply);
        }
        r.map(|()| event).map_err(|why| self.end(why))
    }

    fn input_tls(
        &mut self,
        mut raw: &[u8],
        mqtt: &mut BytesMut,
        reply: &mut BytesMut,
        event: &mut Event,
    ) -> Result<(), &'static str> {
        let Some(tls) = &mut self.tls else { return Ok(()) };
        let path = self.wrapping.ws_path.as_deref().unwrap_or(sluice_core::config::DEFAULT_WS_PATH);
        while !raw.is_empty() {
            if let Err(e) = tls.read_tls(&mut raw) {
                tracing::debug!(error = %e, "TLS input refused");
                return Err("TLS input refused");
            }
            if let Err(e) = tls.process_new_packets() {
                // rustls queued the alert that tells the peer why.
                tracing::debug!(error = %e, "TLS handshake or record refused");
                return Err("TLS refused");
            }
            if !self.established && !tls.is_handshaking() {
                self.established = true;
                let identity = if self.wrapping.identity_as_username {
                    tls.peer_certificates().and_then(|c| c.first()).and_then(|c| certificate_identity(c))
                } else {
                    None
                };
                *event = Event::Established(identity);
            }
            loop {
                let mut reader = tls.reader();
                let chunk = match reader.fill_buf() {
                    Ok([]) => return Err("TLS close_notify"),
                    Ok(chunk) => chunk,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return Err("TLS input ended"),
                };
                let n = chunk.len();
                let r = match &mut self.ws {
                    Some(ws) => ws.feed(chunk, path, self.wrapping.max_frame, mqtt, reply).map_err(|e| e.0),
                    None => {
                        mqtt.extend_from_slice(chunk);
                        Ok(())
                    }
                };
                reader.consume(n);
                r?;
            }
        }
        Ok(())
    }

    fn feed_ws(&mut self, bytes: &[u8], mqtt: &mut BytesMut) -> Result<(), End> {
        let Some(ws) = &mut self.ws else { return Ok(()) };
        if bytes.is_empty() {
            return Ok(());
        }
        let path = self.wrapping.ws_path.as_deref().unwrap_or(sluice_core::config::DEFAULT_WS_PATH);
        let mut reply = BytesMut::new();
        let r = ws.feed(bytes, path, self.wrapping.max_frame, mqtt, &mut reply);
        if !reply.is_empty() {
            self.send_raw(&reply);
        }
        if r.is_err() {
            self.ended = true;
        }
        r
    }

    /// Whether the WebSocket upgrade (if any) is done: a plain ws connection is established
    /// for the state machine at accept; this only tells whether frames may be sent.
    fn may_send_mqtt(&self) -> bool {
        self.ws.as_ref().is_none_or(Ws::upgraded)
    }

    fn end(&mut self, why: &'static str) -> End {
        self.ended = true;
        End(why)
    }

    /// MQTT bytes for the peer.
    pub(crate) fn output(&mut self, mqtt: &[u8]) {
        if self.ended || !self.may_send_mqtt() {
            return;
        }
        if self.ws.is_some() {
            let mut framed = BytesMut::with_capacity(mqtt.len() + 10);
            ws::binary(mqtt, &mut framed);
            self.send_raw(&framed);
        } else {
            self.send_raw(mqtt);
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.tls {
            // Unlimited buffer (set at accept): the driver bounds what it hands over.
            Some(tls) => {
                let _ = tls.writer().write_all(bytes);
            }
            None => self.raw_out.extend_from_slice(bytes),
        }
    }

    /// The state machine is closing the connection: a TLS peer hears close_notify.
    pub(crate) fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            if !self.ended {
                tls.send_close_notify();
            }
        }
        self.ended = true;
    }

    pub(crate) fn has_output(&self) -> bool {
        !self.raw_out.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes queued socket bytes until the kernel takes no more. `Ok(true)`: all written.
    pub(crate) fn write_to(&mut self, stream: &mut TcpStream) -> std::io::Result<bool> {
        loop {
            let r = match &mut self.tls {
                Some(tls) if tls.wants_write() => tls.write_tls(stream),
                _ if !self.raw_out.is_empty() => stream.write(&self.raw_out).inspect(|&n| self.raw_out.advance(n)),
                _ => {
                    // Nothing left: an idle connection keeps no output buffer.
                    self.raw_out = BytesMut::new();
                    return Ok(true);
                }
            };
            match r {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
