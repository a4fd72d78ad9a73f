//! Property tests: whatever bytes arrive, the request parsers, the template
//! language, the cursor decoder, the settings parser and the webhook checks
//! answer with a value or an error, never a panic.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::{Value, json};
use vm_webapp::config::Settings;
use vm_webapp::http::runs::{decode_cursor, parse_create_body};
use vm_webapp::http::webhooks::{sign, signature_headers, verify_signature};
use vm_webapp::steps::parse_steps;
use vm_webapp::steps::template::{Template, TemplateContext};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("kind".to_string()),
                    Just("template".to_string()),
                    Just("op".to_string()),
                    Just("ms".to_string()),
                    Just("prompt".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn create_bodies_of_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_create_body(&bytes);
    }

    #[test]
    fn arbitrary_json_steps_are_accepted_or_refused_never_panic(steps in prop::collection::vec(json_value(), 0..8), input in json_value()) {
        if let Ok(parsed) = parse_steps(&steps, &input) {
            prop_assert!(!parsed.is_empty());
        }
    }

    #[test]
    fn templates_parse_and_render_without_panicking(text in ".{0,200}", input in json_value(), index in 0usize..4) {
        if let Ok(t) = Template::parse(&text) {
            let outputs = [(0usize, json!("x")), (1, json!({"a": [1, 2]}))];
            let _ = t.render(index, &TemplateContext { input: &input, outputs: &outputs });
            let _ = t.check_references(index, &input);
        }
    }

    #[test]
    fn cursors_of_arbitrary_text_never_panic(text in ".{0,100}") {
        let _ = decode_cursor(&text);
    }

    #[test]
    fn settings_of_arbitrary_values_never_panic(values in prop::collection::vec(".{0,40}", 12)) {
        let names = ["APP_ENV", "VM_ENABLE_MANAGED_MODE", "VM_DB_URL", "VM_REDIS_URL", "PORT", "LOG_LEVEL", "VM_API_KEYS",
            "VM_WEBHOOK_SECRETS", "VM_WEBHOOK_ALLOWED_CIDRS", "VM_CORS_ALLOWED_ORIGINS", "VM_JOB_LEASE_MS", "KIMI_BASE_URL"];
        let env: HashMap<&str, String> = names.iter().copied().zip(values).collect();
        let _ = Settings::from_lookup(|k| env.get(k).cloned());
    }

    #[test]
    fn signature_checks_of_arbitrary_input_never_panic_and_never_accept_a_wrong_body(
        body in prop::collection::vec(any::<u8>(), 0..256),
        other in prop::collection::vec(any::<u8>(), 0..256),
        signature in ".{0,80}",
        timestamp in ".{0,12}",
        nonce in ".{0,40}",
    ) {
        let secret: &[u8] = b"secret-0123456789abcdef";
        let _ = verify_signature([secret], &timestamp, &nonce, &body, &signature);
        let good = sign(secret, &timestamp, &nonce, &body);
        prop_assert!(verify_signature([secret], &timestamp, &nonce, &body, &good));
        if other != body {
            prop_assert!(!verify_signature([secret], &timestamp, &nonce, &other, &good));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in [("x-vm-timestamp", &timestamp), ("x-vm-nonce", &nonce), ("x-vm-signature", &signature)] {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
        let _ = signature_headers(&headers);
    }
}
