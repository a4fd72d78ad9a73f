"""The Helm chart, linted and rendered with Helm's own Go SDK (helm-python-sdk),
then checked object by object: what a platform team installs is what the
operator needs, no more, with secure defaults."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from chart import k8s_schema
from conftest import CHART, ROOT

NAMESPACE = "vm-system"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict | None = None, release: str = "vm-operator") -> list[dict]:
    """Every object the chart renders (NOTES.txt left out)."""
    manifests = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(chart: helm.Chart, values: dict | None = None) -> str:
    manifests = chart.render(values or {}, name="vm-operator", namespace=NAMESPACE, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


NON_DEFAULT = {
    "image": {"repository": "registry.example.com/vm-webapp", "tag": "0.2.0", "pullPolicy": "Always"},
    "replicas": 3,
    "leaderElection": {"leaseName": "custom-leader", "leaseDurationSeconds": 30},
    "concurrency": 8,
    "logLevel": "debug",
    "logFormat": "pretty",
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "priorityClassName": "platform-critical",
    "podAnnotations": {"example.com/team": "platform"},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "appPodMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
}


class TestLint:
    def test_chart_lints_clean_in_strict_mode(self) -> None:
        report = helm.lint(CHART, strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2 and "icon" not in m["error"]]
        assert report["errors"] == [] and errors == [], report

    def test_chart_lints_clean_with_non_default_values(self) -> None:
        report = helm.lint(CHART, NON_DEFAULT, strict=True)
        assert report["errors"] == [], report


class TestDefaults:
    def test_default_render_has_exactly_the_expected_objects(self, chart: helm.Chart) -> None:
        kinds = sorted(o["kind"] for o in render(chart))
        assert kinds == sorted([
            "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Role", "RoleBinding", "Deployment", "Service",
        ])

    def test_monitoring_objects_are_absent_by_default(self, chart: helm.Chart) -> None:
        kinds = {o["kind"] for o in render(chart)}
        assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

    def test_deployment_runs_the_operator_as_its_run_help_describes(self, chart: helm.Chart) -> None:
        deployment = one(render(chart), "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "ghcr.io/vmwebapp/vm-webapp:0.1.0"  # appVersion
        assert container["command"] == ["vm-operator"]
        assert container["args"] == [
            "run", "--admin-addr=0.0.0.0:8080", "--concurrency=4",
            "--lease-name=vm-operator-leader", "--lease-duration-seconds=15",
        ]
        env = env_of(container)
        assert "WATCH_NAMESPACE" not in env  # every namespace
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["LOG_LEVEL"]["value"] == "info" and env["LOG_FORMAT"]["value"] == "json"
        assert container["ports"] == [{"name": "admin", "containerPort": 8080, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert pod["serviceAccountName"] == "vm-operator"
        assert deployment["spec"]["replicas"] == 1

    def test_pods_are_restricted_by_default(self, chart: helm.Chart) -> None:
        pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        sc = pod["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "privileged" not in sc and "hostNetwork" not in pod and "hostPID" not in pod

    def test_cluster_wide_rbac_is_exactly_what_the_operator_reports(
        self, chart: helm.Chart, operator_rbac_rules: list[dict]
    ) -> None:
        objects = render(chart)
        cluster_role = one(objects, "ClusterRole")
        lease_role = one(objects, "Role")
        assert lease_role["metadata"]["namespace"] == NAMESPACE
        # Same rules, same order, split only to keep Leases out of other namespaces.
        assert cluster_role["rules"] + lease_role["rules"] == operator_rbac_rules
        assert all(r["apiGroups"] != ["coordination.k8s.io"] for r in cluster_role["rules"])
        for binding, role in [(one(objects, "ClusterRoleBinding"), cluster_role), (one(objects, "RoleBinding"), lease_role)]:
            assert binding["roleRef"]["name"] == role["metadata"]["name"]
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vm-operator", "namespace": NAMESPACE}]

    def test_secrets_are_never_writable(self, chart: helm.Chart) -> None:
        rules = rule_set([r for o in render(chart) if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]])
        assert {v for g, r, v in rules if r == "secrets"} == {"get", "list", "watch"}

    def test_crd_is_the_checked_in_crd_and_kept_on_uninstall(self, chart: helm.Chart) -> None:
        crd = one(render(chart), "CustomResourceDefinition")
        checked_in = yaml.safe_load((ROOT / "crds" / "vmwebapps.webapp.vm.dev.yaml").read_text())
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        crd["metadata"].pop("annotations")
        crd["metadata"].pop("labels")
        assert crd == checked_in, "the chart's CRD differs from crds/: run `make crd`"

    def test_chart_copy_of_the_crd_is_byte_identical(self) -> None:
        copy = CHART / "files" / "crds" / "vmwebapps.webapp.vm.dev.yaml"
        original = ROOT / "crds" / "vmwebapps.webapp.vm.dev.yaml"
        assert copy.read_bytes() == original.read_bytes(), (
            "charts/vm-operator/files/crds/ is stale: run `make crd` (it copies crds/ into the chart)"
        )

    def test_crd_can_be_left_to_another_installer(self, chart: helm.Chart) -> None:
        assert not of_kind(render(chart, {"crds": {"install": False}}), "CustomResourceDefinition")

    def test_metrics_service_targets_the_admin_port_of_every_operator_pod(self, chart: helm.Chart) -> None:
        objects = render(chart)
        service = one(objects, "Service")
        assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "admin", "protocol": "TCP"}]
        pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()

    def test_notes_show_how_to_create_and_wait_for_a_first_vmwebapp(self, chart: helm.Chart) -> None:
        text = notes(chart)
        assert "kind: VmWebapp" in text
        assert "kubectl -n default wait --for=condition=Ready vmw/demo" in text
        assert "deletes EVERY VmWebapp" in text


class TestNonDefaultValues:
    def test_every_option_reaches_the_deployment(self, chart: helm.Chart) -> None:
        deployment = one(render(chart, NON_DEFAULT), "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert deployment["spec"]["replicas"] == 3
        assert container["image"] == "registry.example.com/vm-webapp:0.2.0"
        assert container["imagePullPolicy"] == "Always"
        assert "--lease-name=custom-leader" in container["args"]
        assert "--lease-duration-seconds=30" in container["args"]
        assert "--concurrency=8" in container["args"]
        env = env_of(container)
        assert env["LOG_LEVEL"]["value"] == "debug" and env["LOG_FORMAT"]["value"] == "pretty"
        assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128"
        assert container["resources"] == NON_DEFAULT["resources"]
        assert pod["nodeSelector"] == NON_DEFAULT["nodeSelector"]
        assert pod["tolerations"] == NON_DEFAULT["tolerations"]
        assert pod["affinity"] == NON_DEFAULT["affinity"]
        assert pod["priorityClassName"] == "platform-critical"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert deployment["spec"]["template"]["metadata"]["annotations"] == NON_DEFAULT["podAnnotations"]

    def test_digest_pins_the_image(self, chart: helm.Chart) -> None:
        digest = "sha256:" + "a" * 64
        container = one(render(chart, {"image": {"digest": digest}}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == f"ghcr.io/vmwebapp/vm-webapp:0.1.0@{digest}"

    def test_single_replica_may_run_without_leader_election_and_without_lease_rights(self, chart: helm.Chart) -> None:
        objects = render(chart, {"leaderElection": {"enabled": False}})
        container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        assert "--no-leader-election" in container["args"]
        assert not any(a.startswith("--lease") for a in container["args"])
        assert not of_kind(objects, "Role")

    def test_monitoring_objects_are_rendered_when_enabled(self, chart: helm.Chart) -> None:
        objects = render(chart, NON_DEFAULT)
        monitor = one(objects, "ServiceMonitor")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()
        pod_monitor = one(objects, "PodMonitor")
        assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
        assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} == {"http", "health"}
        rule = one(objects, "PrometheusRule")
        assert rule["metadata"]["labels"]["release"] == "prom"

    def test_prometheus_rule_is_the_plain_rule_file(self, chart: helm.Chart) -> None:
        rule = one(render(chart, {"prometheusRule": {"enabled": True}}), "PrometheusRule")
        plain = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
        assert rule["spec"] == plain
        assert (CHART / "files" / "prometheus-rules.yaml").read_bytes() == (ROOT / "deploy" / "prometheus-rules.yaml").read_bytes(), (
            "deploy/prometheus-rules.yaml and charts/vm-operator/files/prometheus-rules.yaml must be the same file"
        )

    def test_runbook_base_url_can_point_at_a_mirror(self, chart: helm.Chart) -> None:
        values = {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example.com/rb/"}}
        rule = one(render(chart, values), "PrometheusRule")
        urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
        assert urls and all(u.startswith("https://wiki.example.com/rb/Vm") for u in urls), urls


class TestNamespacedMode:
    VALUES = {"watchNamespaces": ["team-a", "team-b"]}

    def test_one_operator_per_watched_namespace_each_with_its_own_lease(self, chart: helm.Chart) -> None:
        deployments = of_kind(render(chart, self.VALUES), "Deployment")
        assert [d["metadata"]["name"] for d in deployments] == ["vm-operator-team-a", "vm-operator-team-b"]
        selectors = [d["spec"]["selector"]["matchLabels"] for d in deployments]
        assert selectors[0] != selectors[1], "two Deployments must not select each other's pods"
        for d, ns in zip(deployments, ["team-a", "team-b"]):
            container = d["spec"]["template"]["spec"]["containers"][0]
            assert env_of(container)["WATCH_NAMESPACE"]["value"] == ns
            assert f"--lease-name=vm-operator-leader-{ns}" in container["args"]

    def test_rbac_is_namespaced_with_no_cluster_wide_rights(
        self, chart: helm.Chart, operator_rbac_rules: list[dict]
    ) -> None:
        objects = render(chart, self.VALUES)
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
        roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in of_kind(objects, "Role")}
        lease_role = roles.pop((NAMESPACE, "vm-operator-leader-election"))
        assert sorted(ns for ns, _ in roles) == ["team-a", "team-b"]
        for role in roles.values():
            assert role["rules"] + lease_role["rules"] == operator_rbac_rules
        bindings = {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in of_kind(objects, "RoleBinding")}
        assert bindings == {("team-a", "vm-operator"), ("team-b", "vm-operator"), (NAMESPACE, "vm-operator-leader-election")}

    def test_pod_monitor_follows_the_watched_namespaces(self, chart: helm.Chart) -> None:
        objects = render(chart, {**self.VALUES, "appPodMonitor": {"enabled": True}})
        assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}

    def test_notes_use_the_first_watched_namespace(self, chart: helm.Chart) -> None:
        assert "kubectl -n team-a wait --for=condition=Ready vmw/demo" in notes(chart, self.VALUES)


class TestRejectedValues:
    @pytest.mark.parametrize(
        "values, message",
        [
            ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
            ({"image": {"tags": "0.2.0"}}, "additional properties 'tags' not allowed"),
            ({"serviceMonitor": {"enable": True}}, "additional properties 'enable' not allowed"),
            ({"replicas": "two"}, "/replicas"),
            ({"logFormat": "xml"}, "/logFormat"),
            ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
            ({"watchNamespaces": ["team-a", "team-a"]}, "/watchNamespaces"),
            ({"leaderElection": {"enabled": "yes"}}, "/leaderElection/enabled"),
            ({"resources": {"requests": {"cpu": True}}}, "/resources/requests/cpu"),
        ],
    )
    def test_schema_rejects_typos_and_wrong_types(self, chart: helm.Chart, values: dict, message: str) -> None:
        with pytest.raises(helm.HelmValuesError, match=message.replace("/", "/")):
            chart.render(values, name="vm-operator", namespace=NAMESPACE)
        report = helm.lint(CHART, values)
        assert report["errors"], f"lint accepted {values}"

    @pytest.mark.parametrize(
        "values, message",
        [
            ({"replicas": 2, "leaderElection": {"enabled": False}}, "enable leader election or set replicas to 1"),
            ({"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}}, "serviceMonitor.enabled needs metrics.service.enabled"),
            ({"extraEnv": [{"name": "WATCH_NAMESPACE", "value": "x"}]}, "extraEnv sets WATCH_NAMESPACE"),
            ({"serviceAccount": {"create": False}}, "name the ServiceAccount to bind"),
        ],
    )
    def test_contradictory_values_fail_with_a_clear_message(self, chart: helm.Chart, values: dict, message: str) -> None:
        with pytest.raises(helm.HelmRenderError, match=message):
            chart.render(values, name="vm-operator", namespace=NAMESPACE)


class TestPassedThroughKubernetesObjects:
    """Kind (issue 11): where the chart passes a Kubernetes object through, its
    schema accepts whatever Kubernetes accepts for that object (and refuses
    what Kubernetes refuses); where the chart owns the keys it stays strict.
    `fsGroupChangePolicy: OnRootMismatch` and the quantity "1e3" were refused."""

    @pytest.mark.parametrize(
        "values, path, expected",
        [
            ({"podSecurityContext": {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}},
             ["spec", "template", "spec", "securityContext", "fsGroupChangePolicy"], "OnRootMismatch"),
            ({"podSecurityContext": {"seLinuxOptions": {"level": "s0:c123,c456"}, "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}],
                                     "supplementalGroupsPolicy": "Strict", "appArmorProfile": {"type": "RuntimeDefault"}}},
             ["spec", "template", "spec", "securityContext", "supplementalGroupsPolicy"], "Strict"),
            ({"podSecurityContext": {"runAsUser": None, "runAsGroup": None}},
             ["spec", "template", "spec", "securityContext", "runAsNonRoot"], True),
            ({"securityContext": {"procMount": "Default", "windowsOptions": {"runAsUserName": "ContainerUser"}}},
             ["spec", "template", "spec", "containers", 0, "securityContext", "procMount"], "Default"),
            ({"resources": {"requests": {"cpu": "1e3", "memory": "1.5Gi"}}},
             ["spec", "template", "spec", "containers", 0, "resources", "requests", "cpu"], "1e3"),
            ({"resources": {"limits": {"nvidia.com/gpu": 1, "hugepages-2Mi": "100Mi", "cpu": 0.5}}},
             ["spec", "template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"], 1),
            ({"resources": {"requests": {"cpu": "+.5", "memory": "128974848e-3"}}},
             ["spec", "template", "spec", "containers", 0, "resources", "requests", "cpu"], "+.5"),
            ({"tolerations": [{"operator": "Exists"}, {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]},
             ["spec", "template", "spec", "tolerations", 0, "operator"], "Exists"),
            ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}}},
             ["spec", "template", "spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms", 0, "matchExpressions", 0, "key"],
             "kubernetes.io/arch"),
            ({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "vm-operator"}}}}]}}},
             ["spec", "template", "spec", "affinity", "podAntiAffinity", "preferredDuringSchedulingIgnoredDuringExecution", 0, "weight"], 100),
            ({"extraEnv": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token", "optional": True}}},
                           {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}]},
             ["spec", "template", "spec", "containers", 0, "env", -1, "valueFrom", "resourceFieldRef", "divisor"], "1Mi"),
            ({"imagePullSecrets": [{"name": "regcred"}, {}]},
             ["spec", "template", "spec", "imagePullSecrets", 0, "name"], "regcred"),
        ],
    )
    def test_what_kubernetes_accepts_the_chart_accepts_and_passes_through(
        self, chart: helm.Chart, values: dict, path: list, expected: object
    ) -> None:
        node = one(render(chart, values), "Deployment")
        for step in path:
            node = node[step]
        assert node == expected
        assert helm.lint(CHART, values)["errors"] == []

    @pytest.mark.parametrize(
        "values, message",
        [
            # Typos inside a passed-through object: Kubernetes would drop them
            # silently (a lost readOnlyRootFilesystem is a lost protection).
            ({"securityContext": {"readOnlyRootFileSystem": True}}, "readOnlyRootFileSystem"),
            ({"podSecurityContext": {"fsGroupChangePolicyy": "OnRootMismatch"}}, "fsGroupChangePolicyy"),
            ({"resources": {"request": {"cpu": "1"}}}, "request"),
            ({"resources": {"requests": {"cpu": "1 Gi"}}}, "/resources/requests/cpu"),
            ({"resources": {"requests": {"memory": "1GB"}}}, "/resources/requests/memory"),
            ({"tolerations": {"key": "dedicated"}}, "/tolerations"),
            ({"tolerations": [{"key": "dedicated", "tolerationSeconds": "30"}]}, "/tolerations/0/tolerationSeconds"),
            ({"affinity": {"nodeAfinity": {}}}, "nodeAfinity"),
            ({"extraEnv": [{"value": "no name"}]}, "name"),
            ({"podSecurityContext": {"runAsUser": "10001"}}, "/podSecurityContext/runAsUser"),
        ],
    )
    def test_what_kubernetes_refuses_the_chart_refuses(self, chart: helm.Chart, values: dict, message: str) -> None:
        with pytest.raises(helm.HelmValuesError, match=message):
            chart.render(values, name="vm-operator", namespace=NAMESPACE)

    def test_kubernetes_definitions_are_the_generated_ones(self) -> None:
        """The pass-through parts come from Kubernetes' own schemas; hand edits
        drift. Regenerate with `.venv-test/bin/python tests/chart/k8s_schema.py`."""
        import json

        schema = json.loads((CHART / "values.schema.json").read_text())
        assert schema == k8s_schema.generated(schema)
        for key, (name, _) in k8s_schema.PASSED_THROUGH.items():
            assert name in json.dumps(schema["properties"][key]), key

    @pytest.mark.parametrize(
        "quantity, valid",
        [("1e3", True), ("100m", True), ("1.5Gi", True), (".5", True), ("-1", True), ("2E-2", True), ("1k", True),
         ("1 Gi", False), ("1GB", False), ("Gi", False), ("1e", False), ("", False), ("1Mii", False)],
    )
    def test_the_quantity_grammar_is_the_api_servers(self, quantity: str, valid: bool) -> None:
        assert bool(re.fullmatch(k8s_schema.QUANTITY_PATTERN.strip("^$"), quantity)) == valid


class TestDocumentation:
    def test_every_value_is_documented_in_values_yaml(self) -> None:
        """A key is documented by the comment right above it. A key without one is a
        section (its own keys need comments); keys inside a documented key's default
        (resources.requests.cpu) are covered by that comment."""
        lines = (CHART / "values.yaml").read_text().splitlines()
        ancestors: list[tuple[int, bool]] = []  # (indent, documented) of enclosing keys
        undocumented = []
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
                continue
            indent = len(line) - len(line.lstrip())
            while ancestors and ancestors[-1][0] >= indent:
                ancestors.pop()
            documented = i > 0 and lines[i - 1].strip().startswith("#")
            is_section = stripped.split(":", 1)[1].strip() == ""
            if not (documented or is_section or any(d for _, d in ancestors)):
                undocumented.append(stripped.split(":", 1)[0])
            ancestors.append((indent, documented))
        assert undocumented == []

    def test_schema_forbids_unknown_keys_in_every_object_it_describes(self) -> None:
        import json

        schema = json.loads((CHART / "values.schema.json").read_text())
        loose = []

        def is_object(node: dict) -> bool:
            kind = node.get("type")
            return kind == "object" or (isinstance(kind, list) and "object" in kind)

        def walk(node: dict, path: str) -> None:
            if is_object(node) and "properties" in node:
                if node.get("additionalProperties") is not False:
                    loose.append(path or "/")
                for key, sub in node["properties"].items():
                    walk(sub, f"{path}/{key}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")

        walk(schema, "")
        # The Kubernetes definitions too: strict like the API server's own
        # field validation, so a typo inside a security context is refused.
        for name, definition in schema.get("definitions", {}).items():
            walk(definition, f"#/definitions/{name}")
        assert loose == []

    def test_every_default_value_is_described_by_the_schema(self, chart: helm.Chart) -> None:
        chart.validate_schema(chart.values)

    def test_crd_deletion_warning_is_in_values_notes_and_readme(self) -> None:
        for path in [CHART / "values.yaml", CHART / "README.md", ROOT / "docs" / "operations.md"]:
            text = path.read_text()
            assert "deletes every VmWebapp" in text, path
