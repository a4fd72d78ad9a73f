"""The Makefile as a newcomer meets it: `make help` lists every target, and the
targets that run a binary reuse the build `make test` made instead of building
silently in another configuration."""

from __future__ import annotations

import re
import subprocess

from conftest import ROOT

MAKEFILE = ROOT / "Makefile"


def documented_targets() -> dict[str, str]:
    """Target name to its `## help` text, as written in the Makefile."""
    return dict(re.findall(r"^([A-Za-z0-9_.-]+):[^\n]*?## (.+)$", MAKEFILE.read_text(), re.M))


def phony_targets() -> set[str]:
    return {name for line in re.findall(r"^\.PHONY:(.*)$", MAKEFILE.read_text(), re.M) for name in line.split()}


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_make_help_lists_every_target_including_names_with_digits() -> None:
    """The help pattern once skipped `e2e`: a name with a digit never matched."""
    listed = {line.split()[0] for line in make("help").stdout.splitlines() if line.strip()}
    documented = documented_targets()
    assert "e2e" in documented, "the e2e target lost its help text"
    assert set(documented) <= listed, f"missing from `make help`: {sorted(set(documented) - listed)}"
    assert phony_targets() <= set(documented), f"targets without `## help`: {sorted(phony_targets() - set(documented))}"


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"`make ([a-z0-9-]+)", (ROOT / "README.md").read_text()))
    assert named, "the README names no make target"
    assert named <= set(documented_targets()), sorted(named - set(documented_targets()))


def test_binary_targets_show_progress_and_share_the_test_build() -> None:
    """`cargo run -q` sat silent for minutes and built another feature set than
    `make test`: a finished `make test` must leave these targets ready."""
    for target in ["render", "check-config", "migrate", "rbac", "crd"]:
        plan = make("-n", target).stdout
        assert "cargo test --workspace --no-run" in plan, f"{target}: {plan}"
        assert " -q" not in plan and "cargo run" not in plan, f"{target}: {plan}"


def test_after_the_test_build_the_binary_targets_build_nothing() -> None:
    """Run by `make test` after `cargo test --workspace`: the shared build is
    already complete, so `make bins` only checks it."""
    result = make("bins")
    assert result.returncode == 0, result.stderr
    assert "Compiling" not in result.stderr, result.stderr
