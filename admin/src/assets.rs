//! The dashboard's files, embedded in the binary (it must work on a closed network: no CDN).
//! uPlot 1.6 (MIT, <https://github.com/leeoniya/uPlot>, from npm `uplot`'s `dist/`) draws the
//! charts; its licence is `assets/uPlot.LICENSE`.

use hyper::StatusCode;

use crate::server::{respond, Resp};

const FILES: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("assets/index.html")),
    ("/dashboard.js", "text/javascript; charset=utf-8", include_str!("assets/dashboard.js")),
    ("/dashboard.css", "text/css; charset=utf-8", include_str!("assets/dashboard.css")),
    ("/uPlot.iife.min.js", "text/javascript; charset=utf-8", include_str!("assets/uPlot.iife.min.js")),
    ("/uPlot.min.css", "text/css; charset=utf-8", include_str!("assets/uPlot.min.css")),
];

pub(crate) fn get(path: &str) -> Option<Resp> {
    let path = if path == "/index.html" { "/" } else { path };
    FILES.iter().find(|(p, _, _)| *p == path).map(|(_, ct, body)| respond(StatusCode::OK, ct, *body))
}
