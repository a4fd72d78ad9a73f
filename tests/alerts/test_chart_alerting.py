"""The chart's alerting and dashboard options: the AlertmanagerConfig with the
routing of docs/alertmanager.yml, labels added to every alert, and the Grafana
dashboards as ConfigMaps for the sidecar, all off by default."""

from __future__ import annotations

import json
from collections.abc import Iterator

import helm_python as helm
import pytest
import yaml

from chart.test_chart import of_kind, one, render
from conftest import CHART, ROOT

PAGER = {"routingKeySecret": {"name": "pagerduty", "key": "key"}}
CHAT = {"webhookUrlSecret": {"name": "slack"}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def test_nothing_of_it_is_rendered_by_default(chart: helm.Chart) -> None:
    kinds = {o["kind"] for o in render(chart)}
    assert not kinds & {"AlertmanagerConfig", "ConfigMap", "PrometheusRule"}


def test_alertmanager_config_routes_like_the_documented_example(chart: helm.Chart) -> None:
    config = one(render(chart, {"alertmanagerConfig": {"enabled": True, "pager": PAGER, "chat": CHAT}}), "AlertmanagerConfig")
    example = yaml.safe_load((ROOT / "docs" / "alertmanager.yml").read_text())
    spec = config["spec"]
    assert spec["route"]["receiver"] == example["route"]["receiver"]
    assert spec["route"]["groupBy"] == example["route"]["group_by"]
    routes = [(r["matchers"][0]["name"] + '="' + r["matchers"][0]["value"] + '"', r["receiver"], r["groupWait"] if "groupWait" in r else None)
              for r in spec["route"]["routes"]]
    assert routes == [(r["matchers"][0], r["receiver"], r.get("group_wait")) for r in example["route"]["routes"]]
    inhibit = spec["inhibitRules"][0]
    assert (inhibit["sourceMatch"][0]["value"], inhibit["targetMatch"][0]["value"], inhibit["equal"]) == ("critical", "warning", ["namespace", "vmwebapp"])
    pager = next(r for r in spec["receivers"] if r["name"] == "pager")["pagerdutyConfigs"][0]
    assert pager["routingKey"] == {"name": "pagerduty", "key": "key"}
    assert pager["pagerDutyLinkConfigs"][0]["href"] == "{{ .CommonAnnotations.runbook_url }}"
    chat = next(r for r in spec["receivers"] if r["name"] == "chat")["slackConfigs"][0]
    assert chat["apiURL"] == {"name": "slack", "key": "webhook-url"}
    assert chat["actions"][0]["url"] == "{{ (index .Alerts 0).Annotations.runbook_url }}"


@pytest.mark.parametrize("values, message", [
    ({"alertmanagerConfig": {"enabled": True, "chat": CHAT}}, "alertmanagerConfig.pager.routingKeySecret.name"),
    ({"alertmanagerConfig": {"enabled": True, "pager": PAGER}}, "alertmanagerConfig.chat.webhookUrlSecret.name"),
])
def test_alertmanager_config_needs_both_secrets(chart: helm.Chart, values: dict, message: str) -> None:
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        render(chart, values)


@pytest.mark.parametrize("values", [
    {"alertmanagerConfig": {"enabeld": True}},
    {"grafanaDashboards": {"label": "has space"}},
    {"prometheusRule": {"alertLabels": {"severity": "info"}}},
])
def test_schema_refuses_typos_and_overriding_severity(chart: helm.Chart, values: dict) -> None:
    with pytest.raises(Exception):
        chart.validate_schema(values)


def test_alert_labels_reach_every_alert_and_severity_stays(chart: helm.Chart) -> None:
    rule = one(render(chart, {"prometheusRule": {"enabled": True, "alertLabels": {"team": "payments"}}}), "PrometheusRule")
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
    for group, plain_group in zip(rule["spec"]["groups"], plain["groups"], strict=True):
        for r, p in zip(group["rules"], plain_group["rules"], strict=True):
            assert r["labels"] == {**p["labels"], "team": "payments"}
            assert {k: v for k, v in r.items() if k != "labels"} == {k: v for k, v in p.items() if k != "labels"}


def test_dashboards_become_configmaps_for_the_grafana_sidecar(chart: helm.Chart) -> None:
    objects = render(chart, {"grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "vmwebapp"}}})
    maps = {m["metadata"]["name"]: m for m in of_kind(objects, "ConfigMap")}
    assert set(maps) == {"vm-operator-dashboard-vmwebapp-overview", "vm-operator-dashboard-vmwebapp-operator"}
    for name, cm in maps.items():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "vmwebapp"}
        assert cm["metadata"]["namespace"] == "vm-system"
        (key, text), = cm["data"].items()
        assert text == (ROOT / "deploy" / "grafana" / key).read_text().rstrip("\n")
        assert json.loads(text)["uid"] == name.removeprefix("vm-operator-dashboard-")


def test_dashboards_can_go_to_grafanas_namespace_with_its_label(chart: helm.Chart) -> None:
    values = {"grafanaDashboards": {"enabled": True, "namespace": "monitoring", "label": "dashboards", "labelValue": "vm"}}
    for cm in of_kind(render(chart, values), "ConfigMap"):
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["labels"]["dashboards"] == "vm"
