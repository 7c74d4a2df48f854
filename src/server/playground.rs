//! `GET /`: the playground, one self-contained HTML page compiled into the
//! binary (no files to ship, nothing fetched from elsewhere).
//!
//! It streams `/v1/generate` over `fetch` (server-sent events), colours text
//! by the adapter that served it, shows images as they form (previews), and
//! runs `/v1/compare` side by side. `?prompt=...&auto=generate|compare`
//! fills the form and runs it, which `scripts/playground_check.sh` uses.

use actix_web::HttpResponse;

pub const PLAYGROUND_HTML: &str = include_str!("static/playground.html");

pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PLAYGROUND_HTML)
}
