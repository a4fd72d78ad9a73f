//! Golden files of `vm-operator render` for every manifest in `examples/`. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p vm-operator --test render` and review the diff: it is
//! exactly what changes on clusters at the next reconcile.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check_golden(example: &str) {
    let manifest =
        std::fs::read_to_string(root().join("examples").join(example)).expect("example exists");
    let rendered = vm_operator::render::render(&manifest, &[]).expect("example renders");
    let golden = root().join("operator/tests/golden").join(example);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &rendered).expect("write golden file");
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        expected == rendered,
        "render of examples/{example} differs from operator/tests/golden/{example}; \
         if the change is intended run UPDATE_GOLDEN=1 cargo test -p vm-operator --test render\n--- rendered ---\n{rendered}"
    );
}

#[test]
fn minimal_example_renders_as_its_golden_file() {
    check_golden("minimal.yaml");
}

#[test]
fn production_example_renders_as_its_golden_file() {
    check_golden("production.yaml");
}

#[test]
fn backup_example_renders_as_its_golden_file() {
    check_golden("backup.yaml");
}

#[test]
fn tenants_example_renders_as_its_golden_file() {
    check_golden("tenants.yaml");
}

#[test]
fn every_example_has_a_golden_file() {
    for entry in std::fs::read_dir(root().join("examples")).expect("examples dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        // Other examples (the plans file a ConfigMap holds) are not VmWebapps.
        let text = std::fs::read_to_string(entry.path()).expect("example reads");
        if !text.lines().any(|l| l.trim() == "kind: VmWebapp") {
            continue;
        }
        assert!(
            root().join("operator/tests/golden").join(&name).exists(),
            "examples/{} has no golden file",
            name.to_string_lossy()
        );
    }
}

#[test]
fn secrets_given_to_render_change_the_config_hash() {
    let manifest =
        std::fs::read_to_string(root().join("examples/production.yaml")).expect("example exists");
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: vm-db}\nstringData: {url: 'postgres://a'}\n";
    let rotated = "apiVersion: v1\nkind: Secret\nmetadata: {name: vm-db}\nstringData: {url: 'postgres://b'}\n";
    let offline = vm_operator::render::render(&manifest, &[]).expect("renders");
    let with_secret =
        vm_operator::render::render(&manifest, &[secret.to_owned()]).expect("renders");
    let with_rotated =
        vm_operator::render::render(&manifest, &[rotated.to_owned()]).expect("renders");
    assert_ne!(offline, with_secret);
    assert_ne!(with_secret, with_rotated);
    assert!(
        !with_secret.contains("postgres://"),
        "secret values must never be rendered"
    );
}
