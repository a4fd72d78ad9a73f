//! The `vm-operator` binary's errors, as a newcomer meets them: each is printed once, on
//! stderr, with its cause chain deduplicated and a next step, and the exit code is 1.

use std::process::Command;

fn operator() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vm-operator"));
    c.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    c
}

fn stderr_of(c: &mut Command) -> String {
    let out = c.output().expect("the binary runs");
    assert_eq!(out.status.code(), Some(1), "exit code");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn render_of_a_file_that_is_not_a_manifest_prints_its_error_once_with_a_next_step() {
    // Issue kind: `render -f README.md` printed the parse error twice (message and source).
    let err = stderr_of(operator().args(["render", "-f", "README.md"]));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("error: cannot render README.md: invalid manifest"),
        "{err}"
    );
    assert!(
        lines[1].starts_with("next step: pass a VmWebapp manifest"),
        "{err}"
    );
    let detail = lines[0].trim_start_matches("error: cannot render README.md: invalid manifest: ");
    assert_eq!(err.matches(detail).count(), 1, "{err}");
}

#[test]
fn render_of_a_missing_file_names_it_once() {
    let err = stderr_of(operator().args(["render", "-f", "no-such-file.yaml"]));
    assert_eq!(err.matches("no-such-file.yaml").count(), 1, "{err}");
    assert!(err.contains("next step:"), "{err}");
}

#[test]
fn run_without_a_cluster_prints_one_error_that_points_at_kubeconfig_and_render() {
    // Issue kind: "cannot build a Kubernetes client" came with the same cause four times
    // and no hint.
    let err = stderr_of(
        operator()
            .args(["run", "--no-leader-election", "--log-format", "pretty"])
            .env("KUBECONFIG", "/nonexistent/vm-operator-test-kubeconfig")
            .env("HOME", "/nonexistent")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT"),
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("error: cannot build a Kubernetes client"),
        "{err}"
    );
    assert_eq!(
        err.matches("/nonexistent/vm-operator-test-kubeconfig")
            .count(),
        1,
        "{err}"
    );
    assert!(lines[1].contains("KUBECONFIG"), "{err}");
    assert!(lines[1].contains("vm-operator render"), "{err}");
}

#[test]
fn a_mistyped_log_level_is_refused_before_anything_starts() {
    // Without this, `--log-level infoo` was read as a filter for a target called `infoo`:
    // the operator ran with no logs at all.
    for (args, env) in [
        (vec!["run", "--log-level", "infoo"], None),
        (vec!["run", "--log-level", "warn,vm_operatr"], None),
        (vec!["run"], Some("verbose")),
    ] {
        let mut c = operator();
        c.args(&args).env_remove("RUST_LOG");
        if let Some(level) = env {
            c.env("LOG_LEVEL", level);
        }
        let out = c.output().expect("the binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not a log level"), "{args:?}: {err}");
    }
}

#[test]
fn an_invalid_rust_log_is_refused_not_replaced_silently() {
    let mut c = operator();
    c.args(["run", "--no-leader-election", "--log-format", "pretty"])
        .env("RUST_LOG", "info,=[")
        .env("KUBECONFIG", "/nonexistent/kubeconfig");
    let err = stderr_of(&mut c);
    assert!(err.contains("RUST_LOG is not a valid log filter"), "{err}");
}

#[test]
fn level_names_and_target_directives_are_accepted_as_log_levels() {
    for level in ["debug", "WARN", "warn,vm_operator=debug"] {
        let mut c = operator();
        c.args(["run", "--no-leader-election", "--log-level", level])
            .env_remove("RUST_LOG")
            .env("KUBECONFIG", "/nonexistent/kubeconfig");
        // Past argument parsing: it fails later, for want of a cluster.
        let err = stderr_of(&mut c);
        assert!(!err.contains("is not a log level"), "{level}: {err}");
    }
}
