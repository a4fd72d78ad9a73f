"""The Kubernetes part of the chart's values schema, generated from the
Kubernetes OpenAPI schemas that the `kubernetes-validate` package ships.

Where the chart passes a Kubernetes object through (security contexts,
resources, affinity, tolerations, env, pull secrets), `values.schema.json`
refers to these definitions, so it accepts exactly what Kubernetes accepts for
that object (every field, nulls included, and no unknown field: a typo such as
`readOnlyRootFileSystem` is refused instead of silently dropped). Keys the
chart owns stay described by hand, strictly.

Regenerate after changing `KUBERNETES` or `PASSED_THROUGH`:

    .venv-test/bin/python tests/chart/k8s_schema.py

`tests/chart/test_chart.py` fails while the checked-in schema differs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).resolve().parents[2] / "charts" / "vm-operator" / "values.schema.json"

# Newest schemas in the pinned package: a field added by a later Kubernetes is
# accepted (the API server of an older cluster decides), none is refused.
KUBERNETES = "v1.37.0"

# values key -> (Kubernetes definition, whether the value is a list of it)
PASSED_THROUGH: dict[str, tuple[str, bool]] = {
    "imagePullSecrets": ("io.k8s.api.core.v1.LocalObjectReference", True),
    "extraEnv": ("io.k8s.api.core.v1.EnvVar", True),
    "resources": ("io.k8s.api.core.v1.ResourceRequirements", False),
    "tolerations": ("io.k8s.api.core.v1.Toleration", True),
    "affinity": ("io.k8s.api.core.v1.Affinity", False),
    "podSecurityContext": ("io.k8s.api.core.v1.PodSecurityContext", False),
    "securityContext": ("io.k8s.api.core.v1.SecurityContext", False),
}

QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# The OpenAPI schema says only "string or number"; the API server parses a
# quantity with this grammar (apimachinery resource.Quantity): a signed
# decimal, then a binary suffix (Ki…Ei), a decimal suffix (m, k, M…E) or an
# exponent (e3, E-2). "1e3", "0.5", "100m", "1Gi" pass; "1 Gi" and "1GB" fail.
QUANTITY_PATTERN = (
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)


def kubernetes_definitions() -> dict[str, Any]:
    """Every definition of the pinned version, strict variant (unknown fields refused)."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("kubernetes-validate is missing: run `make deps` (requirements-test.txt)")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "kubernetes-json-schema" / f"{KUBERNETES}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def _clean(node: Any) -> Any:
    """Drops prose and Kubernetes extensions, and points refs at `definitions`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in {"description", "format"} or key.startswith("x-kubernetes-"):
                continue
            if key == "$ref":
                value = value.replace("#/$defs/", "#/definitions/")
            out[key] = _clean(value)
        return out
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if "$ref" in node else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def definitions() -> dict[str, Any]:
    """The definitions the passed-through keys need, and nothing else."""
    all_defs = kubernetes_definitions()
    wanted: dict[str, Any] = {}
    todo = [name for name, _ in PASSED_THROUGH.values()]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted[name] = _clean(all_defs[name])
        todo.extend(_refs(wanted[name]) - wanted.keys())
    wanted[QUANTITY] = {
        "anyOf": [
            {"type": "string", "pattern": QUANTITY_PATTERN},
            {"type": "number"},
            {"type": "null"},
        ]
    }
    return dict(sorted(wanted.items()))


def properties() -> dict[str, Any]:
    """The schema of each passed-through key."""
    out = {}
    for key, (name, is_list) in PASSED_THROUGH.items():
        ref = {"$ref": f"#/definitions/{name}"}
        out[key] = {"type": ["array", "null"], "items": ref} if is_list else ref
    return out


def generated(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its Kubernetes parts replaced by freshly generated ones."""
    out = dict(schema)
    out["properties"] = {**schema["properties"], **properties()}
    out["definitions"] = definitions()
    return out


def main() -> None:
    schema = json.loads(SCHEMA.read_text())
    SCHEMA.write_text(json.dumps(generated(schema), indent=2) + "\n")
    print(f"wrote {SCHEMA}")


if __name__ == "__main__":
    main()
