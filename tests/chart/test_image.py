"""The container image cannot be built on our machines, so its Dockerfile is
checked against what runs it: the operator's pod builders (command, user,
workspace) and the chart (command). A change on one side fails here."""

from __future__ import annotations

import re

import helm_python as helm

from conftest import CHART, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONSTS = (ROOT / "operator" / "src" / "consts.rs").read_text()


def const(name: str) -> str:
    match = re.search(rf"pub const {name}: [^=]+= \"?([^\";]+)\"?;", CONSTS)
    assert match, name
    return match.group(1)


def final_stage() -> str:
    return DOCKERFILE.rsplit("\nFROM ", 1)[1]


def test_both_binaries_are_on_the_runtime_path() -> None:
    stage = final_stage()
    assert re.search(r"COPY --from=builder /out/bin/vm-webapp /out/bin/vm-operator /usr/local/bin/", stage)
    assert const("COMMAND") == "vm-webapp"  # what the operator's Deployments and Jobs run
    assert "cp target/release/vm-webapp target/release/vm-operator /out/bin/" in DOCKERFILE


def test_image_runs_as_the_user_the_operator_pods_declare() -> None:
    assert f"USER {const('RUN_AS_USER')}:{const('RUN_AS_USER')}" in final_stage()
    with helm.Chart.load(CHART) as chart:
        values = chart.values
    assert values["podSecurityContext"]["runAsUser"] == int(const("RUN_AS_USER"))


def test_workspace_is_the_one_the_operator_mounts() -> None:
    root = const("WORKSPACE_ROOT")
    assert root == "/var/data/vm"
    stage = final_stage()
    assert f"ENV VM_WORKSPACE_ROOT={root}" in stage
    assert f"--chown=10001:10001 /out/var/data/vm {root}" in stage


def test_runtime_has_no_shell_and_an_entrypoint_for_the_api() -> None:
    stage = final_stage()
    assert stage.startswith("gcr.io/distroless/cc-debian12")
    assert "RUN " not in stage  # nothing to run it with: no shell
    assert 'ENTRYPOINT ["vm-webapp"]' in stage
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in stage


def test_chart_runs_the_operator_binary_of_this_image() -> None:
    with helm.Chart.load(CHART) as chart:
        deployment = chart.render({}, name="vm-operator", namespace="x")["vm-operator/templates/deployment.yaml"]
    assert 'command: ["vm-operator"]' in deployment


def test_build_context_keeps_what_the_build_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    copied = re.findall(r"^COPY (?!--from)([^\n]+) \S+$", DOCKERFILE, re.M)
    sources = {s for line in copied for s in line.split()}
    assert sources == {"Cargo.toml", "Cargo.lock", "app", "operator", "examples", "crds"}
    assert not sources & ignored
    assert "target" in ignored and ".git" in ignored
