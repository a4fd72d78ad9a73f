//! The checked-in CRD matches the code, and its CEL rules accept the examples and reject
//! the combinations the architecture forbids (evaluated locally with kube-cel, the same
//! rule language the API server runs).

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use vm_operator::crd::VmWebapp;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema() -> Value {
    let crd = serde_json::to_value(VmWebapp::crd()).expect("crd serialises");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Validate an object the way the API server does: defaults first, then CEL rules.
fn validate(object: &Value) -> Result<(), Vec<String>> {
    let schema = schema();
    let defaulted = kube_cel::apply_defaults(&schema, object);
    kube_cel::Validator::new()
        .validate(&schema, &defaulted, None)
        .map_err(|e| e.into_vec().into_iter().map(|e| e.message).collect())
}

fn example(name: &str) -> Value {
    let text =
        std::fs::read_to_string(repo_root().join("examples").join(name)).expect("example exists");
    serde_yaml::from_str(&text).expect("example is YAML")
}

fn with_spec(patch: Value) -> Value {
    let mut obj = json!({
        "apiVersion": "webapp.vm.dev/v1alpha1",
        "kind": "VmWebapp",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {
            "image": "img:1",
            "database": {"name": "db", "key": "url"},
            "auth": {"apiKeys": {"name": "keys", "key": "keys"}}
        }
    });
    if let (Some(spec), Some(p)) = (obj["spec"].as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            spec.insert(k.clone(), v.clone());
        }
    }
    obj
}

#[test]
fn checked_in_crd_is_what_the_code_prints() {
    let path = repo_root().join("crds/vmwebapps.webapp.vm.dev.yaml");
    let generated = vm_operator::render::crd_yaml().expect("crd renders");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).expect("write crd");
    }
    let checked_in = std::fs::read_to_string(&path).expect("crds file exists");
    assert!(
        checked_in == generated,
        "crds/vmwebapps.webapp.vm.dev.yaml is stale: run `cargo run -p vm-operator -- crd > crds/vmwebapps.webapp.vm.dev.yaml` (or UPDATE_GOLDEN=1 cargo test -p vm-operator)"
    );
}

#[test]
fn crd_has_status_subresource_short_name_and_printer_columns() {
    let crd = serde_json::to_value(VmWebapp::crd()).expect("crd serialises");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["vmw"]));
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["subresources"]["status"], json!({}));
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Image", "API", "Worker", "Last Backup", "Age"]
    );
}

#[test]
fn every_schema_property_has_a_description() {
    fn walk(path: &str, s: &Value, missing: &mut Vec<String>) {
        if let Some(props) = s["properties"].as_object() {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").is_none()
                    && !p.starts_with(".metadata")
                    && p != ".apiVersion"
                    && p != ".kind"
                {
                    missing.push(p.clone());
                }
                walk(&p, v, missing);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    walk("", &schema(), &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn every_cel_rule_compiles() {
    let compiled = kube_cel::compile_schema(&schema());
    let errors: Vec<String> = compiled
        .compilation_errors()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    assert!(
        errors.is_empty(),
        "CEL rules that do not compile: {errors:?}"
    );
}

#[test]
fn both_examples_pass_the_schema_rules() {
    for name in ["minimal.yaml", "production.yaml", "backup.yaml"] {
        assert_eq!(validate(&example(name)), Ok(()), "{name}");
    }
}

#[test]
fn backups_without_a_shared_database_are_rejected() {
    let mut obj = with_spec(json!({
        "backup": {"schedule": "@daily", "claimName": "vm-backups"}
    }));
    assert_eq!(validate(&obj), Ok(()));
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("database");
        spec.insert("appEnv".into(), json!("local"));
        spec.insert("migrations".into(), json!({"enabled": false}));
        spec.insert("api".into(), json!({"replicas": 1}));
        spec.insert("worker".into(), json!({"replicas": 0}));
    }
    let errors = validate(&obj).expect_err("must be rejected");
    assert!(
        errors
            .iter()
            .any(|m| m.contains("spec.backup needs spec.database")),
        "{errors:?}"
    );
}

#[test]
fn managed_mode_without_redis_is_rejected() {
    let errors = validate(&with_spec(json!({"managedMode": true}))).expect_err("must be rejected");
    assert!(
        errors.iter().any(|m| m.contains("managedMode requires")),
        "{errors:?}"
    );
}

#[test]
fn managed_mode_with_database_and_redis_is_accepted() {
    let obj = with_spec(json!({"managedMode": true, "redis": {"name": "r", "key": "url"}}));
    assert_eq!(validate(&obj), Ok(()));
}

#[test]
fn several_replicas_without_a_database_are_rejected() {
    let mut obj = with_spec(json!({"migrations": {"enabled": false}}));
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("database");
    }
    let errors = validate(&obj).expect_err("default replicas need a shared database");
    assert!(
        errors.iter().any(|m| m.contains("embedded SQLite")),
        "{errors:?}"
    );
}

#[test]
fn api_port_and_worker_health_port_must_differ() {
    let obj = with_spec(json!({"api": {"port": 9091}}));
    let errors = validate(&obj).expect_err("clashing ports");
    assert!(
        errors.iter().any(|m| m.contains("must differ")),
        "{errors:?}"
    );
}

#[test]
fn autoscaling_minimum_above_maximum_is_rejected() {
    let obj = with_spec(json!({"api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}));
    let errors = validate(&obj).expect_err("min > max");
    assert!(
        errors.iter().any(|m| m.contains("must not exceed")),
        "{errors:?}"
    );
}

#[test]
fn extra_env_cannot_override_operator_managed_variables() {
    let obj = with_spec(json!({"env": [{"name": "VM_DB_URL", "value": "sqlite://x"}]}));
    let errors = validate(&obj).expect_err("managed variable");
    assert!(
        errors.iter().any(|m| m.contains("operator manages")),
        "{errors:?}"
    );
}

#[test]
fn extra_env_needs_exactly_one_of_value_and_secret() {
    let obj = with_spec(json!({"env": [{"name": "A"}]}));
    let errors = validate(&obj).expect_err("neither value nor secret");
    assert!(
        errors.iter().any(|m| m.contains("exactly one")),
        "{errors:?}"
    );
}

#[test]
fn long_names_are_rejected() {
    let mut obj = with_spec(json!({}));
    obj["metadata"]["name"] = json!("a".repeat(41));
    let errors = validate(&obj).expect_err("name too long");
    assert!(
        errors.iter().any(|m| m.contains("at most 40")),
        "{errors:?}"
    );
}

#[test]
fn staging_without_a_database_is_rejected_because_only_local_mode_embeds_sqlite() {
    // The app refuses to start in staging or production without VM_DB_URL.
    let mut obj = with_spec(json!({
        "appEnv": "staging", "api": {"replicas": 1}, "worker": {"replicas": 0}, "migrations": {"enabled": false}
    }));
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("database");
    }
    let errors = validate(&obj).expect_err("staging needs a database");
    assert!(
        errors
            .iter()
            .any(|m| m.contains("only local mode embeds SQLite")),
        "{errors:?}"
    );
    obj["spec"]["appEnv"] = json!("local");
    assert_eq!(validate(&obj), Ok(()));
}

#[test]
fn production_without_api_keys_is_rejected() {
    // appEnv defaults to production, and the app refuses to start there without VM_API_KEYS:
    // without this rule the API server would accept a spec whose pods crash-loop.
    let mut obj = with_spec(json!({}));
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("auth");
    }
    let errors = validate(&obj).expect_err("production needs API keys");
    assert!(
        errors
            .iter()
            .any(|m| m.contains("requires spec.auth.apiKeys")),
        "{errors:?}"
    );
    obj["spec"]["auth"] = json!({});
    assert!(
        validate(&obj).is_err(),
        "an empty auth section is not enough"
    );
    obj["spec"]["appEnv"] = json!("staging");
    assert_eq!(validate(&obj), Ok(()), "staging may run the API open");
}

#[test]
fn webhook_allowed_cidrs_must_be_addresses_or_blocks() {
    let ok = with_spec(
        json!({"webhooks": {"allowedCidrs": ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]}}),
    );
    assert_eq!(validate(&ok), Ok(()));
    let bad = with_spec(json!({"webhooks": {"allowedCidrs": ["10.0.0.0/8,192.0.2.1"]}}));
    let errors = validate(&bad).expect_err("a comma inside one entry");
    assert!(
        errors.iter().any(|m| m.contains("allowedCidrs")),
        "{errors:?}"
    );
}

#[test]
fn cors_origins_must_be_bare_origins() {
    let ok = with_spec(
        json!({"api": {"corsAllowedOrigins": ["https://app.example.com", "http://localhost:3000"]}}),
    );
    assert_eq!(validate(&ok), Ok(()));
    for bad in ["app.example.com", "https://app.example.com/path", "*"] {
        let obj = with_spec(json!({"api": {"corsAllowedOrigins": [bad]}}));
        assert!(validate(&obj).is_err(), "{bad} must be rejected");
    }
}

#[test]
fn trusted_proxy_header_and_runtime_role_must_be_names() {
    let obj = with_spec(json!({"api": {"trustedProxyHeader": "x-forwarded-for: evil"}}));
    let errors = validate(&obj).expect_err("not a header name");
    assert!(
        errors.iter().any(|m| m.contains("trustedProxyHeader")),
        "{errors:?}"
    );
    let obj = with_spec(json!({"migrations": {"runtimeRole": "vm_app; DROP ROLE x"}}));
    let errors = validate(&obj).expect_err("not a role name");
    assert!(
        errors.iter().any(|m| m.contains("runtimeRole")),
        "{errors:?}"
    );
    let obj = with_spec(json!({
        "api": {"trustedProxyHeader": "X-Forwarded-For"},
        "migrations": {"runtimeRole": "vm_app"}
    }));
    assert_eq!(validate(&obj), Ok(()));
}

#[test]
fn extra_env_cannot_set_the_security_variables_behind_spec_fields() {
    for name in [
        "VM_API_KEYS",
        "VM_WEBHOOK_SECRETS",
        "VM_MIGRATION_DB_URL",
        "VM_SHUTDOWN_DELAY_MS",
    ] {
        let obj = with_spec(json!({"env": [{"name": name, "value": "x"}]}));
        let errors = validate(&obj).expect_err("managed variable");
        assert!(
            errors.iter().any(|m| m.contains("operator manages")),
            "{name}: {errors:?}"
        );
    }
}

#[test]
fn shutdown_delay_defaults_to_a_few_seconds() {
    let schema = schema();
    let api = &schema["properties"]["spec"]["properties"]["api"];
    assert_eq!(api["properties"]["shutdownDelayMs"]["default"], json!(5000));
    assert_eq!(api["default"]["shutdownDelayMs"], json!(5000));
}

#[test]
fn names_that_cannot_become_a_service_name_are_rejected() {
    // Issue kind: `my.app` was accepted, then every pass failed on the Service (DNS-1035).
    for bad in ["my.app", "1demo", "Demo", "demo-", "de_mo"] {
        let mut obj = with_spec(json!({}));
        obj["metadata"]["name"] = json!(bad);
        let errors = validate(&obj).expect_err("not a DNS-1035 label");
        assert!(
            errors.iter().any(|m| m.contains("DNS-1035")),
            "{bad}: {errors:?}"
        );
    }
    for good in ["demo", "a", "shop-2"] {
        let mut obj = with_spec(json!({}));
        obj["metadata"]["name"] = json!(good);
        assert_eq!(validate(&obj), Ok(()), "{good}");
    }
}
