//! The web console: a runs list with status filters, a run page whose
//! timeline follows the run's event stream, and the approvals inbox.
//!
//! - `GET /console` (and `/console/`): the page
//! - `GET /console/assets/console.js`, `…/console.css`, `…/favicon.svg`
//!
//! The files are compiled into the binary (no front-end build, nothing
//! fetched from elsewhere) and carry no data: the page asks for an API key,
//! keeps it in the tab's `sessionStorage`, and calls the API with it. So
//! these routes need no key. They get a Content-Security-Policy of their own
//! that allows only these assets and calls to this origin (no inline script
//! or style); every other route keeps the API's `default-src 'none'`.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::AppState;

/// The console's Content-Security-Policy: its own scripts, styles and API
/// calls, nothing inline, nothing from elsewhere, never framed.
pub const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");
const ICON: &str = include_str!("../../console/favicon.svg");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONSOLE_CSP),
    );
    response
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

/// The console's routes (not part of the API document).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/assets/console.js", get(script))
        .route("/console/assets/console.css", get(style))
        .route("/console/assets/favicon.svg", get(icon))
}
