"""deploy/ stays true to the service: files parse, every charted or alerted metric exists, the
manifests probe the real gRPC port and health service, and the container health check works."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, start_http_server

import sieve.service.metrics  # noqa: F401  (registers Sieve's metrics)
from sieve.service.config import ServerConfig
from sieve.v1 import sieve_pb2

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
SEARCH_SERVICE = sieve_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
CONFIG_VARIABLES = {f"SIEVE_{field.name.upper()}" for field in dataclasses.fields(ServerConfig)}
DEFAULTS = ServerConfig()
MEMORY_LIMIT_BYTES = 4 * 1024**3


def load_yaml(path: Path) -> list:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "sieve.json").read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def manifests() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_yaml(path):
            if "kind" in document and document["kind"] != "Kustomization":
                found[(document["kind"], document["metadata"]["name"])] = document
    return found


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Parsing ----------------------------------------------------------------------------------------
def test_every_yaml_and_json_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 15
    for path in files:
        parsed = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
        assert parsed, f"{path} is empty"


# Metrics: deploy/ and service/metrics.py name the same things ----------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}
BUILTIN_SERIES = {"up"}  # written by Prometheus itself for every target


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are no function, keyword or label."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    identifiers = re.findall(r"(?<![\w$])([A-Za-z_:][\w:]*)\s*(\()?", expr)
    return {name for name, call in identifiers if not call and name.lower() not in PROMQL_WORDS}


def exported_series() -> set[str]:
    """Every series name the process can export, including those of labelled metrics not yet used."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "summary": ["_count", "_sum"]}
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
        names.update(sample.name for sample in family.samples)
    return names


def test_promql_metric_names_parser():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (rpc, le) (rate(a_bucket{rpc=~"x|y"}[5m]))) > 5 and on (job) b') == {
            "a_bucket", "b"}
    assert promql_metric_names("(c and on (job, instance) d) > 0.9 * scalar(rec:limit)") == {"c", "d", "rec:limit"}


def test_every_charted_and_alerted_metric_is_exported():
    recorded = {rule["record"] for rule in alert_rules() if "record" in rule}
    known = exported_series() | BUILTIN_SERIES | recorded
    assert "process_resident_memory_bytes" in known
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    used = set().union(*map(promql_metric_names, exprs))
    assert {"sieve_requests_total", "sieve_request_duration_seconds_bucket", "sieve_ingest_lag_entries"} <= used
    assert used - known == set(), "deploy/ charts or alerts on metrics the service does not export"


def test_every_sieve_metric_is_charted_or_alerted():
    used = set().union(*map(promql_metric_names, dashboard_exprs() + [r["expr"] for r in alert_rules()]))
    sieve_families = {family.name for family in REGISTRY.collect() if family.name.startswith("sieve_")}
    unused = {name for name in sieve_families if not any(series.startswith(name) for series in used)}
    assert unused == set(), "metrics exported but on no dashboard panel or alert"


def test_dashboard_panels_are_complete_and_use_the_provisioned_datasource():
    (datasource,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]["datasources"]
    panels = dashboard()["panels"]
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in ("request rate", "errors", "p50", "p99", "stage latency", "rerank survivors", "documents",
                  "token pooling", "bytes on disk", "ingestion throughput", "ingestion lag", "cache hit ratio",
                  "gpu memory", "rss"):
        assert topic in titles
    charts = [panel for panel in panels if panel["type"] != "row"]
    assert all(panel["datasource"]["uid"] == datasource["uid"] for panel in charts)
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = [(panel["gridPos"]["x"], panel["gridPos"]["y"]) for panel in panels]
    assert len(set(cells)) == len(cells), "panels overlap"


# Prometheus --------------------------------------------------------------------------------------
def test_alert_rules_cover_the_operating_risks():
    alerts = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    assert {"SieveHighErrorRatio", "SieveHighLatencyP99", "SieveIngestLagGrowing", "SieveIngestOldestPendingTooOld",
            "SieveCacheUnavailable", "SieveNotReady", "SieveMemoryNearLimit"} <= set(alerts)
    assert all(rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
               for rule in alerts.values())
    (limit,) = [rule["expr"] for rule in alert_rules() if rule.get("record") == "sieve:memory_limit_bytes"]
    assert limit == f"vector({MEMORY_LIMIT_BYTES})"


def test_prometheus_scrapes_the_compose_services_on_the_metrics_port():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    services = load_yaml(DEPLOY / "compose.yaml")[0]["services"]
    port = services["sieve"]["environment"]["SIEVE_METRICS_PORT"]
    assert targets == {"sieve": [f"sieve:{port}"], "sieve-worker": [f"sieve-worker:{port}"]}
    assert all((DEPLOY / "prometheus" / path).is_file() for path in config["rule_files"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (apt-get install prometheus)")
@pytest.mark.parametrize("command", [["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                                     ["test", "rules", "alerts.test.yml"]], ids=" ".join)
def test_promtool(command):
    result = subprocess.run(["promtool", *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Kubernetes --------------------------------------------------------------------------------------
def test_k8s_has_every_kind_and_kustomization_lists_every_manifest():
    kinds = sorted(kind for kind, _ in manifests())
    assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                            "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service"])
    assert all("namespace" not in m["metadata"] for m in manifests().values())
    listed = set(load_yaml(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}


def test_server_probes_use_grpc_health_on_the_service_port():
    found = manifests()
    server = container(found[("Deployment", "sieve")])
    config = found[("ConfigMap", "sieve-config")]["data"]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"grpc": int(config["SIEVE_PORT"]), "metrics": int(config["SIEVE_METRICS_PORT"])}
    probes = {kind: server[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    assert all(probe["grpc"]["port"] == ports["grpc"] for probe in probes.values())
    assert probes["readiness"]["grpc"]["service"] == SEARCH_SERVICE
    startup = probes["startup"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "models need ~20 s; leave room"
    liveness = probes["liveness"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > DEFAULTS.drain_seconds, "a drain is not death"
    grace = found[("Deployment", "sieve")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS.drain_seconds + 5  # preStop sleep, then the drain
    service = found[("Service", "sieve")]["spec"]["ports"]
    assert {(p["port"], p["targetPort"]) for p in service} == {(ports["grpc"], "grpc"), (ports["metrics"], "metrics")}


def test_selectors_match_the_server_pods_and_the_worker_is_the_only_writer():
    found = manifests()
    server, worker = found[("Deployment", "sieve")], found[("Deployment", "sieve-worker")]
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    assert found[("Service", "sieve")]["spec"]["selector"] == pod_labels
    assert found[("PodDisruptionBudget", "sieve")]["spec"]["selector"]["matchLabels"] == pod_labels
    assert worker["spec"]["selector"]["matchLabels"] != pod_labels
    hpa = found[("HorizontalPodAutoscaler", "sieve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sieve"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"] and "cpu" in container(server)["resources"]["requests"]
    assert worker["spec"]["replicas"] == 1 and worker["spec"]["strategy"]["type"] == "Recreate"
    assert container(worker)["args"] == ["worker"] and container(server)["args"] == ["serve"]
    assert found[("PersistentVolumeClaim", "sieve-data")]["spec"]["accessModes"] == ["ReadWriteMany"]

    def data_mount(deployment):
        (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == "sieve-data"
        (mount,) = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == found[("ConfigMap", "sieve-config")]["data"]["SIEVE_DATA"]
        return mount
    assert data_mount(server)["readOnly"] is True and not data_mount(worker).get("readOnly")


def test_k8s_environment_names_real_settings_and_existing_secret_keys():
    found = manifests()
    assert set(found[("ConfigMap", "sieve-config")]["data"]) <= CONFIG_VARIABLES
    secret = found[("Secret", "sieve-secrets")]["stringData"]
    for name in ("sieve", "sieve-worker"):
        spec = found[("Deployment", name)]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        env = container(found[("Deployment", name)])["env"]
        assert {variable["name"] for variable in env} <= CONFIG_VARIABLES
        assert all(variable["valueFrom"]["secretKeyRef"]["key"] in secret for variable in env)
        (secret_volume,) = [v["secret"] for v in spec["volumes"] if "secret" in v]
        assert all(item["key"] in secret for item in secret_volume["items"])
        assert container(found[("Deployment", name)])["resources"]["limits"]["memory"] == "4Gi"  # = MEMORY_LIMIT


def test_k8s_manifests_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for (kind, name), document in manifests().items():
        kubernetes_validate.validate(document, "1.30.0", strict=True)


# Compose and images ------------------------------------------------------------------------------
def test_compose_runs_the_five_services_with_consistent_settings():
    compose = load_yaml(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"sieve", "sieve-worker", "redis", "prometheus", "grafana"}
    assert services["sieve"]["command"] == ["serve"] and services["sieve-worker"]["command"] == ["worker"]
    for name in ("sieve", "sieve-worker"):
        service = services[name]
        assert set(service["environment"]) <= CONFIG_VARIABLES
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["mem_limit"] == "4g"  # = MEMORY_LIMIT_BYTES
        assert all(secret in compose["secrets"] for secret in service["secrets"])
    assert services["sieve"]["volumes"] == ["sieve-data:/var/lib/sieve:ro"]  # the worker is the only writer
    assert services["sieve-worker"]["volumes"] == ["sieve-data:/var/lib/sieve"]
    password = services["sieve"]["environment"]["SIEVE_REDIS_PASSWORD"]
    assert password in services["redis"]["command"] and "--requirepass" in services["redis"]["command"]
    assert services["sieve"]["environment"]["SIEVE_REDIS_URL"].startswith("redis://redis:")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DEPLOY / source).exists(), f"{name}: {source} is missing"
            assert source.startswith(".") or source in compose["volumes"]
    assert (DEPLOY / compose["secrets"]["sieve-api-keys"]["file"]).with_suffix(".example").is_file()
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "sieve.yaml")[0]["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_runs_sieve_as_a_non_root_user_with_a_health_check(flavour):
    dockerfile = (DEPLOY / "docker" / f"Dockerfile.{flavour}").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER sieve$", final_stage, re.M) and "--uid 10001" in final_stage
    assert re.search(r"^EXPOSE 50051 9100$", final_stage, re.M)
    assert re.search(r"^VOLUME /var/lib/sieve$", final_stage, re.M)
    assert 'CMD ["python", "/opt/sieve/healthcheck.py"]' in final_stage
    assert 'ENTRYPOINT ["sieve"]' in final_stage and 'CMD ["serve"]' in final_stage
    assert {name for name in re.findall(r"\b(SIEVE_\w+)=", final_stage)} <= CONFIG_VARIABLES
    assert "torch==2.13.0" in dockerfile
    allowed = (DEPLOY / "docker" / f"Dockerfile.{flavour}.dockerignore").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for source in line.split():
            assert (ROOT / source).exists(), f"the image copies {source}, which the repository lacks"
            assert f"!{source}" in allowed or f"!{source}/" in allowed, f"{source} is left out of the build context"


# The container health check ----------------------------------------------------------------------
def run_healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SIEVE_")}
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env={**environment, **env},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def health_server():
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def test_healthcheck_follows_the_grpc_health_status(health_server):
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(SIEVE_PORT=str(port)).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading, or draining
    result = run_healthcheck(SIEVE_PORT=str(port))
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr
    closed = run_healthcheck(SIEVE_PORT=str(free_port()))
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_healthcheck_speaks_tls_when_the_server_does(tmp_path):
    from concurrent import futures

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        assert run_healthcheck(SIEVE_PORT=str(port), SIEVE_TLS_CERT=str(cert)).returncode == 0
        assert run_healthcheck(SIEVE_PORT=str(port)).returncode == 1  # plaintext against a TLS port
    finally:
        server.stop(None)


def test_healthcheck_metrics_mode_for_the_worker():
    port = free_port()
    assert run_healthcheck("--metrics", SIEVE_METRICS_PORT=str(port)).returncode == 1
    server, thread = start_http_server(port, addr="127.0.0.1")
    try:
        assert run_healthcheck("--metrics", SIEVE_METRICS_PORT=str(port)).returncode == 0
    finally:
        server.shutdown()
        thread.join()
