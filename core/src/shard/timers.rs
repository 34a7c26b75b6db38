//! What happens because time passed: keep-alive, delayed wills, session expiry.

use super::*;

/// MQTT 5 reason code 0xA0: the connection lived as long as it may (here: its token expired).
const MAXIMUM_CONNECT_TIME: u8 = 0xA0;

impl Shard {
    /// Closes active connections silent for one and a half keep-alive intervals (0x8D).
    pub(super) fn close_silent_connections(&mut self, now_ms: u64) {
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::Active { .. } if c.keep_alive_ms > 0 => {
                    now_ms.saturating_sub(c.last_rx_ms) > c.keep_alive_ms * 3 / 2
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.protocol_close(id, reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout", now_ms);
        }
        if !self.access.enabled() {
            return;
        }
        // A JWT's `exp` ends the connection (MQTT 5: 0xA0, maximum connect time).
        let token_expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.is_active() && c.auth.as_ref().and_then(|a| a.expires_at_ms).is_some_and(|t| t <= now_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in token_expired {
            self.protocol_close(id, MAXIMUM_CONNECT_TIME, "the token expired", now_ms);
        }
    }

    /// Publishes wills whose delay ran out, and ends offline sessions whose expiry ran out.
    pub(super) fn expire_wills_and_sessions(&mut self, now_ms: u64) {
        let mut wills = Vec::new();
        let mut ended = Vec::new();
        for s in self.sessions.values_mut() {
            if let Some((_, w)) = s.pending_will.take_if(|(at, _)| *at <= now_ms) {
                wills.push((s.client_id.clone(), w));
            }
            if let Some(at) = s.expires_at_ms {
                if s.conn.is_none() && at <= now_ms {
                    ended.push(s.client_id.clone());
                }
            }
        }
        for (id, w) in wills {
            self.publish_will(&id, *w, now_ms);
            self.release_claim(0, &id, now_ms);
        }
        for id in ended {
            if let Some(s) = self.sessions.remove(&id) {
                self.end_session(s, now_ms);
            }
        }
    }
}
