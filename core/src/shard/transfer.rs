use super::*;

impl Shard {
    /// Directory: `host` wants the session of `client_id` for its connection `conn`. Carried out
    /// now, or after the claim under way (see [`DirEntry`]).
    pub(super) fn on_claim(&mut self, client_id: ClientId, host: ShardId, conn: ConnId, clean_start: bool) {
        let e = self.directory.entry(client_id.clone()).or_default();
        if e.busy {
            e.waiting.push_back((host, conn, clean_start));
            return;
        }
        e.busy = true;
        match e.host.replace(host) {
            Some(prev) => self.send_to_shard(prev, ShardMsg::Evict { client_id, to: host, conn, clean_start }),
            None => self.send_to_shard(host, ShardMsg::Transfer { client_id, conn, session: None }),
        }
    }

    /// Directory: the claim under way for `client_id` is carried out.
    pub(super) fn on_settled(&mut self, client_id: ClientId, host: ShardId, hosting: bool) {
        let Some(e) = self.directory.get_mut(&client_id) else { return };
        e.busy = false;
        if !hosting && e.host == Some(host) {
            e.host = None;
        }
        if let Some((host, conn, clean_start)) = e.waiting.pop_front() {
            self.on_claim(client_id, host, conn, clean_start);
        } else if e.host.is_none() {
            self.directory.remove(&client_id);
        }
    }
}
