//! `.env.example` documents the default of every setting. The defaults that
//! decide how long a graceful stop may take are the ones operators size
//! grace periods and proxies by (the operator's own copies in
//! `operator/src/consts.rs` are held to the app by its contract test): a
//! default changed in `config.rs` alone would leave the documentation wrong.

mod support;

use std::time::Duration;

/// The value `.env.example` gives `name` (an uncommented `NAME=value` line).
fn documented(name: &str) -> String {
    let text = include_str!("../../.env.example");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} is not in .env.example"))
        .trim()
        .to_string()
}

fn ms(name: &str) -> Duration {
    Duration::from_millis(documented(name).parse().expect("a number of ms"))
}

#[test]
fn the_shutdown_related_defaults_are_the_documented_ones() {
    // Quick-test defaults set none of these, so the app's own defaults apply.
    let s = support::settings_from(&[]).expect("settings");
    assert_eq!(s.queue.shutdown_grace, ms("VM_SHUTDOWN_GRACE_MS"));
    assert_eq!(s.security.request_timeout, ms("VM_REQUEST_TIMEOUT_MS"));
    assert_eq!(s.stream.write_timeout, ms("VM_STREAM_WRITE_TIMEOUT_MS"));
}
