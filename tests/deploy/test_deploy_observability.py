"""The Grafana dashboard and the Prometheus alert rules parse, and every metric they use is
one the worker exports (a renamed metric would otherwise leave a silent, empty panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics_core import Metric

from worker.service.metrics import GroupMetrics, Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "forge-worker.json"

_METRIC = re.compile(r"\b(forge_worker_[a-z0-9_]+)\b")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_names() -> set[str]:
    """Every series name the worker's registry (and a group's supervisor's) can expose."""
    names: set[str] = set()
    family: Metric
    metrics = Metrics()
    GroupMetrics(metrics.registry)
    for family in metrics.registry.collect():
        names.update(family.name + s for s in _SUFFIXES[family.type])
    return names


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def _balanced(expr: str) -> bool:
    """Brackets pair up outside string literals (a cheap stand-in for promtool)."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for i, ch in enumerate(expr):
        if ch == '"' and (i == 0 or expr[i - 1] != "\\"):
            in_string = not in_string
        if in_string:
            continue
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_string


def test_every_metric_referenced_is_exported() -> None:
    exported = exported_names()
    used = {
        m
        for e in [r["expr"] for r in alert_rules()] + dashboard_exprs()
        for m in _METRIC.findall(e)
    }
    assert used, "no worker metric referenced at all"
    assert used <= exported, f"not exported by worker.metrics: {sorted(used - exported)}"


def test_the_issue_s_panels_and_alerts_are_there() -> None:
    used = " ".join(dashboard_exprs())
    for name in (
        "forge_worker_messages_total",
        "forge_worker_processing_seconds_bucket",
        "forge_worker_in_flight",
        "forge_worker_queue_depth",
        "forge_worker_message_age_seconds_bucket",
        "forge_worker_receipts_published_total",
        "forge_worker_duplicates_total",
    ):
        assert name in used, name
    assert "histogram_quantile(0.5," in used and "histogram_quantile(0.99," in used
    alerts = {r["alert"]: r for r in alert_rules()}
    assert "dlq" in alerts["ForgeWorkerDeadLetters"]["expr"]
    assert "> 0" in alerts["ForgeWorkerDeadLetters"]["expr"]
    assert "forge_worker_ready" in alerts["ForgeWorkerNotReady"]["expr"]
    assert "forge_worker_queue_consumers" in alerts["ForgeWorkerNoConsumers"]["expr"]
    assert "message_age" in alerts["ForgeWorkerInboxMessagesOld"]["expr"]
    assert "deriv(" in alerts["ForgeWorkerInboxBacklogGrowing"]["expr"]


def test_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert _balanced(rule["expr"]), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert doc["uid"] == "forge-worker"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert _balanced(t["expr"]), p["title"]
    # queue regexes in the exported JSON match the names topology gives the queues
    from worker.amqp import topology

    inbox_only = re.compile(r".+\.(dlq|retry\.[0-9]+s)")
    assert inbox_only.fullmatch(topology.dead_letter_name("ucan.invocations"))
    assert inbox_only.fullmatch(topology.retry_name("ucan.invocations", 30))
    assert not inbox_only.fullmatch("ucan.invocations")
