"""Shared fixtures of the chart and docs tests (run by `make test` after the
Cargo tests, which build the `vm-webapp` and `vm-operator` binaries used here).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vm-operator"


def binary(name: str) -> Path:
    """A binary of the workspace as `cargo test --workspace` left it."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `cargo test --workspace` (or `make test`) first")
    return path


@pytest.fixture(scope="session")
def operator_rbac_rules() -> list[dict]:
    """The rules `vm-operator rbac` prints: the operator's own list."""
    out = subprocess.run(
        [binary("vm-operator"), "rbac"], check=True, capture_output=True, text=True
    ).stdout
    return yaml.safe_load(out)["rules"]
