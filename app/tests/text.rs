//! Kind: text that reaches the database from a request is stored faithfully
//! or refused with a 4xx and a stable code, never a 500. PostgreSQL refuses NUL
//! bytes in text (SQLSTATE 22021) where SQLite stores them, so every path from
//! a request to a text column is fed NUL bytes, other control characters,
//! non-ASCII and invalid UTF-8 (percent-encoded) on both backends.

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::{Backend, TestEnv, send};

const KEYS: &str = "ops:ops-key-0123456789abcdef:admin";
const OPS: &str = "Bearer ops-key-0123456789abcdef";

/// Percent-encodes every byte, so NUL and invalid UTF-8 travel in the URL.
fn pct(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

fn nasty_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\0".to_vec()),
        Just(b"a\0b".to_vec()),
        Just(vec![0xff, 0xfe]),
        Just(vec![0xc3]),
        Just("é\u{1}\u{7f}".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ]
}

async fn every_request_text_is_stored_or_refused_never_a_500(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    let rt = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    let result = runner.run(&nasty_bytes(), |bytes| {
        let app = app.clone();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let failures = tokio::task::block_in_place(|| {
            rt.block_on(async move {
                let enc = pct(&bytes);
                let json_text = serde_json::to_string(&text).expect("json string");
                let body = format!(
                    r#"{{"input":{{"k":{json_text}}},"steps":[{{"kind":"template","template":{json_text}}}]}}"#
                );
                let mut failures = Vec::new();
                let auth = [("authorization", OPS)];
                for (method, uri, body) in [
                    ("GET", format!("/api/v2/audit?actor={enc}"), None),
                    ("GET", format!("/api/v2/audit?action={enc}"), None),
                    ("GET", format!("/api/v2/audit?outcome={enc}"), None),
                    ("GET", format!("/api/v2/runs?status={enc}"), None),
                    ("GET", format!("/api/v2/runs?cursor={enc}"), None),
                    ("GET", format!("/api/v2/runs/{enc}"), None),
                    ("GET", format!("/api/v2/runs/{enc}/events"), None),
                    ("POST", format!("/api/v2/runs/{enc}/cancel"), None),
                    ("POST", format!("/api/v2/webhooks/{enc}"), Some("{}".to_string())),
                    ("POST", "/api/v2/runs".to_string(), Some(body.clone())),
                ] {
                    let reply = send(&app, method, &uri, body.as_deref(), &auth).await;
                    if reply.status.is_server_error() {
                        failures.push(format!("{method} {uri} -> {} {}", reply.status, reply.body));
                    }
                }
                failures
            })
        });
        prop_assert!(failures.is_empty(), "{:?}", failures);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A JSON string with a NUL character (`\u0000`) is stored faithfully: the
/// input comes back as sent on both backends.
async fn a_nul_character_in_json_input_is_stored_faithfully(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    let auth = [("authorization", OPS)];
    let created = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(r#"{"input":{"k":"a\u0000b"},"steps":[{"kind":"template","template":"x"}]}"#),
        &auth,
    )
    .await;
    assert_eq!(created.status.as_u16(), 202, "{}", created.body);
    let id = created.body["id"].as_str().expect("id").to_string();
    let got = send(&app, "GET", &format!("/api/v2/runs/{id}"), None, &auth).await;
    assert_eq!(got.body["input"]["k"], "a\u{0}b");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    every_request_text_is_stored_or_refused_never_a_500,
    a_nul_character_in_json_input_is_stored_faithfully,
);
