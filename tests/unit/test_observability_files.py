"""The observability stack's files (infra/observability/) are what Grafana, Prometheus, Tempo,
the collector, Docker Compose and Swarm need: valid, complete, and pointing at files that exist.

No registry is reachable here, so the images are never pulled; these tests read the files as
the programs would. tests/observability/test_prometheus.py runs every dashboard query for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "infra" / "observability"
DASHBOARDS = sorted((OBS / "grafana" / "dashboards").glob("*.json"))
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "heatmap", "table"}


def _yaml(name: str) -> Any:
    return yaml.safe_load((OBS / name).read_text())


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # rows
    return out


def _provisioned_datasources() -> dict[str, str]:
    sources = _yaml("grafana/provisioning/datasources/cumulus.yaml")["datasources"]
    return {s["uid"]: s["type"] for s in sources}


def test_three_dashboards_named_as_the_issue_says() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {
        "Cumulus fleet overview",
        "Cumulus workers and GPU shares",
        "Cumulus job latency breakdown",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_has_what_grafana_needs(path: Path) -> None:
    board = json.loads(path.read_text())
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"])
    assert board["title"]
    assert board["schemaVersion"] >= 36
    sources = _provisioned_datasources()
    panels = _panels(board)
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"], panel
        assert panel.get("description"), panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] in sources, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] in sources
            assert sources[target["datasource"]["uid"]] == "prometheus"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] in sources


def test_job_ids_are_never_a_label_in_a_query() -> None:
    for path in DASHBOARDS:
        assert "job_id" not in path.read_text()


def test_gpu_heatmap_and_trace_links() -> None:
    boards = {json.loads(p.read_text())["uid"]: json.loads(p.read_text()) for p in DASHBOARDS}
    heatmaps = [p for p in _panels(boards["cumulus-workers"]) if p["type"] == "heatmap"]
    assert heatmaps
    assert "cumulus_gpu_tenths_allocated" in heatmaps[0]["targets"][0]["expr"]
    latency = _panels(boards["cumulus-latency"])
    assert any(t.get("exemplar") for p in latency for t in p["targets"])
    assert any("tempo" in link["url"] for p in latency for link in p.get("links", []))
    prometheus = next(
        s
        for s in _yaml("grafana/provisioning/datasources/cumulus.yaml")["datasources"]
        if s["type"] == "prometheus"
    )
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations == [
        {"name": "trace_id", "datasourceUid": "tempo", "urlDisplayLabel": "Open trace in Tempo"}
    ]


def test_dashboard_provider_points_where_compose_mounts_the_dashboards() -> None:
    provider = _yaml("grafana/provisioning/dashboards/cumulus.yaml")["providers"][0]
    compose = _yaml("docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_collector_takes_otlp_and_sends_traces_to_tempo_and_metrics_to_prometheus() -> None:
    collector = _yaml("otel-collector.yaml")
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipelines = collector["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo"]
    assert collector["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    assert pipelines["metrics"]["exporters"] == ["prometheusremotewrite"]
    assert "prometheus:9090" in collector["exporters"]["prometheusremotewrite"]["endpoint"]
    for pipeline in pipelines.values():
        for part in ("receivers", "processors", "exporters"):
            for name in pipeline.get(part, []):
                assert name in collector[part], name


def _compose_services() -> dict[str, Any]:
    services: dict[str, Any] = _yaml("docker-compose.yml")["services"]
    return services


def test_compose_starts_the_four_parts_with_their_files_and_ports() -> None:
    services = _compose_services()
    assert set(services) == {"otel-collector", "tempo", "prometheus", "grafana"}
    published = {
        name: {int(str(p).split(":")[0]) for p in svc.get("ports", [])}
        for name, svc in services.items()
    }
    assert published == {
        "otel-collector": {4317, 4318},
        "tempo": {3200},
        "prometheus": {9090},
        "grafana": {3000},
    }
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (OBS / source).exists(), source
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]


def test_swarm_stack_configs_are_files_that_exist() -> None:
    stack = _yaml("stack.yml")
    assert set(stack["services"]) == {"otel-collector", "tempo", "prometheus", "grafana"}
    configs = stack["configs"]
    for config in configs.values():
        assert (OBS / config["file"]).is_file(), config["file"]
    for svc in stack["services"].values():
        for used in svc.get("configs", []):
            assert used["source"] in configs
        assert svc["deploy"]["replicas"] == 1
    grafana = {c["source"] for c in stack["services"]["grafana"]["configs"]}
    dashboards = {c for c in grafana if c.startswith("dashboard-")}
    assert len(dashboards) == len(DASHBOARDS)
    assert stack["networks"]["cumulus"] == {"external": True, "name": "cumulus_cumulus"}


def test_prometheus_targets_carry_a_process_label() -> None:
    for path in (OBS / "targets").glob("*.json"):
        for group in json.loads(path.read_text()):
            assert group["targets"]
            assert group["labels"]["process"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus not installed")
@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-swarm.yml"])
def test_promtool_accepts_the_scrape_configs(name: str) -> None:
    checked = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(OBS / name)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
