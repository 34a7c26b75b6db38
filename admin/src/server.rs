//! Connections, authentication and routing of the HTTP endpoint.
//!
//! Invariants: at most [`HTTP_CONNECTIONS_MAX`] connections are served (the next one is closed
//! at accept, counted); every route but `/healthz` and `/readyz` needs the configured
//! credentials when there are any (401 with a `WWW-Authenticate: Basic` challenge otherwise,
//! so a browser asks); an unknown path is 404, a known path with another method 405.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use sluice_core::shard::{AdminQuery, AdminReply};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{HttpSettings, Sources, HTTP_CONNECTIONS_MAX, REQUEST_BODY_MAX, SHARD_ANSWER_TIMEOUT};

/// A response body: whole (most routes) or a stream of chunks (the live view).
pub(crate) enum RespBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }
}

pub(crate) type Resp = Response<RespBody>;

pub(crate) fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(RespBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn json_resp(status: StatusCode, v: &serde_json::Value) -> Resp {
    respond(status, "application/json", v.to_string())
}

/// A refusal with a message that says what was wrong: `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into() }
    }
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into() }
    }
    pub(crate) fn into_resp(self) -> Resp {
        json_resp(self.status, &json!({ "error": self.message }))
    }
}

/// What every request handler shares.
pub(crate) struct State {
    pub(crate) settings: HttpSettings,
    pub(crate) sources: Sources,
    /// Live views open now (bounded by `LIVE_STREAMS_MAX`) and the next tap id.
    pub(crate) live_open: Arc<Semaphore>,
    pub(crate) next_tap: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
}

impl State {
    /// Asks every shard `q`; their answers in shard order.
    pub(crate) async fn ask_all(&self, q: AdminQuery) -> Result<Vec<AdminReply>, ApiError> {
        let mut waits = Vec::with_capacity(self.sources.shards.len());
        for (shard, tx) in self.sources.shards.iter().enumerate() {
            let (otx, orx) = oneshot::channel();
            tx.try_send((q.clone(), otx)).map_err(|_| {
                ApiError::unavailable(format!("shard {shard} has too many questions waiting; try again"))
            })?;
            waits.push(orx);
        }
        let mut out = Vec::with_capacity(waits.len());
        for (shard, w) in waits.into_iter().enumerate() {
            match tokio::time::timeout(SHARD_ANSWER_TIMEOUT, w).await {
                Ok(Ok(AdminReply::Refused(why))) => return Err(ApiError::bad(why)),
                Ok(Ok(r)) => out.push(r),
                _ => {
                    return Err(ApiError::unavailable(format!(
                        "shard {shard} did not answer within {} ms",
                        SHARD_ANSWER_TIMEOUT.as_millis()
                    )))
                }
            }
        }
        Ok(out)
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let s = &self.settings;
        if s.token.is_none() && s.username.is_none() {
            return true;
        }
        let Some(h) = req.headers().get(AUTHORIZATION).and_then(|h| h.to_str().ok()) else { return false };
        if let (Some(token), Some(given)) = (&s.token, h.strip_prefix("Bearer ")) {
            return same(token.as_bytes(), given.trim().as_bytes());
        }
        let Some(b64) = h.strip_prefix("Basic ") else { return false };
        use base64::Engine;
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else { return false };
        let Some(colon) = raw.iter().position(|b| *b == b':') else { return false };
        let (user, pass) = (&raw[..colon], &raw[colon + 1..]);
        if let (Some(u), Some(p)) = (&s.username, &s.password) {
            if same(u.as_bytes(), user) & same(p.as_bytes(), pass) {
                return true;
            }
        }
        // A browser cannot send a bearer token: the token is accepted as a basic-auth password.
        s.token.as_ref().is_some_and(|t| same(t.as_bytes(), pass))
    }
}

/// Compares in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) async fn serve(listener: std::net::TcpListener, settings: HttpSettings, sources: Sources) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "HTTP endpoint cannot use its socket");
            return;
        }
    };
    let state = Arc::new(State {
        settings,
        sources,
        live_open: Arc::new(Semaphore::new(crate::LIVE_STREAMS_MAX)),
        next_tap: AtomicU64::new(1),
        refused_connections: AtomicU64::new(0),
    });
    let permits = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    let tls = state.settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.refused_connections.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    // A handshake that does not finish in time holds no connection slot longer.
                    if let Ok(Ok(s)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        serve_connection(state, s).await;
                    }
                }
                None => serve_connection(state, stream).await,
            }
            drop(permit);
        });
    }
}

/// A TLS handshake (HTTPS) must finish within this long after accept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 connection, plain or TLS, until it closes; request headers within 10 s.
async fn serve_connection<IO>(state: Arc<State>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc);
    let _ = conn.await;
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    match path.as_str() {
        "/healthz" => return respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => return crate::api::readyz(state).await,
        _ => {}
    }
    if !state.authorized(&req) {
        let mut r = json_resp(StatusCode::UNAUTHORIZED, &json!({ "error": "credentials required" }));
        r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"sluice\""));
        return r;
    }
    if req.body().size_hint().lower() > REQUEST_BODY_MAX {
        return ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, message: "request body too large".into() }
            .into_resp();
    }
    // The API takes no body; read (bounded) and drop whatever came so the connection stays usable.
    let body = http_body_util::Limited::new(req.into_body(), REQUEST_BODY_MAX as usize);
    if body.collect().await.is_err() {
        return ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, message: "request body too large".into() }
            .into_resp();
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let res = crate::api::route(state, &method, &path, &params).await;
    res.unwrap_or_else(ApiError::into_resp)
}

/// `Method` check for a route: 405 otherwise.
pub(crate) fn only(method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError { status: StatusCode::METHOD_NOT_ALLOWED, message: format!("method {method} not allowed here") })
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn credentials_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"", b"x"));
    }
}
