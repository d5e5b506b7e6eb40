"""deploy/ stays true to the service: files parse, every charted or alerted metric and label exists,
the manifests run one writer and read-only replicas with the settings the server reads, probe real
health service names, and the container health check works against a real server."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from sieve.service import metrics
from sieve.service.auth import load_keys
from sieve.service.config import ServerConfig
from sieve.service.process import ServerProcess, free_port
from sieve.v1 import sieve_pb2

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
API_KEYS_EXAMPLE = DEPLOY / "secrets" / "api-keys.example"
CONFIG_VARIABLES = {f"SIEVE_{field.name.upper()}" for field in dataclasses.fields(ServerConfig)}
DEFAULTS = ServerConfig()
MEMORY_LIMIT_BYTES = 4 * 1024**3
# The names the server's health service answers for (service/server.py).
HEALTH_NAMES = {"", "sieve.redis"} | {service.full_name for service in sieve_pb2.DESCRIPTOR.services_by_name.values()}
JOBS = {"reader": "sieve", "writer": "sieve-writer"}  # k8s component label -> Prometheus job


def load_yaml(path: Path) -> list:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "sieve.json").read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def all_exprs() -> list[str]:
    return dashboard_exprs() + [rule["expr"] for rule in alert_rules()]


def manifests() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_yaml(path):
            if "kind" in document and document["kind"] != "Kustomization":
                found[(document["kind"], document["metadata"]["name"])] = document
    return found


def deployments() -> dict[str, dict]:
    """The writer and reader Deployments, by their app.kubernetes.io/component label."""
    found = [m for (kind, _), m in manifests().items() if kind == "Deployment"]
    return {m["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in found}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")[0]


def k8s_environment(role: str) -> dict[str, str]:
    """SIEVE_* variables a pod of this role gets, secrets left out."""
    config = manifests()[("ConfigMap", "sieve-config")]["data"]
    env = {v["name"]: v["value"] for v in container(deployments()[role])["env"] if "value" in v}
    return {**config, **env}


def server_config(environment: dict[str, str], monkeypatch) -> ServerConfig:
    for name in list(os.environ):
        if name.startswith("SIEVE_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return ServerConfig.from_env()


# Parsing ----------------------------------------------------------------------------------------
def test_every_yaml_and_json_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 16
    for path in files:
        parsed = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
        assert parsed, f"{path} is empty"


# Metrics: deploy/ and service/metrics.py name the same things ----------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}
BUILTIN_SERIES = {"up"}  # written by Prometheus itself for every target
TARGET_LABELS = {"job", "instance", "namespace"}  # added by the scrape, not by Sieve


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are no function, keyword or label."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    identifiers = re.findall(r"(?<![\w$])([A-Za-z_:][\w:]*)\s*(\()?", expr)
    return {name for name, call in identifiers if not call and name.lower() not in PROMQL_WORDS}


def promql_label_matchers(expr: str) -> set[tuple[str, str]]:
    """(metric, label) for every `metric{label=...}` selector."""
    found = set()
    for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
        found.update((metric, label) for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return found


def exported_series() -> set[str]:
    """Every series name the process can export, including those of labelled metrics not yet used."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "summary": ["_count", "_sum"]}
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
        names.update(sample.name for sample in family.samples)
    return names


def sieve_labels() -> dict[str, set[str]]:
    """Series name -> label names, for Sieve's metrics (prometheus_client keeps them in _labelnames)."""
    labels = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            series = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(metric._type, [""])
            for suffix in series:
                labels[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_promql_parsers():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (rpc, le) (rate(a_bucket{rpc=~"x|y"}[5m]))) > 5 and on (job) b') == {
            "a_bucket", "b"}
    assert promql_metric_names("(c and on (job, instance) d) > 0.9 * scalar(rec:limit)") == {"c", "d", "rec:limit"}
    assert promql_label_matchers('min(a{backend="redis", job=~"x|y"}) / b{code!="OK"}') == {
        ("a", "backend"), ("a", "job"), ("b", "code")}


def test_every_charted_and_alerted_metric_is_exported():
    recorded = {rule["record"] for rule in alert_rules() if "record" in rule}
    known = exported_series() | BUILTIN_SERIES | recorded
    assert "process_resident_memory_bytes" in known
    used = set().union(*map(promql_metric_names, all_exprs()))
    assert {"sieve_requests_total", "sieve_request_duration_seconds_bucket", "sieve_ingest_lag_entries"} <= used
    assert used - known == set(), "deploy/ charts or alerts on metrics the service does not export"


def test_every_label_matcher_names_a_label_of_its_metric():
    labels = sieve_labels()
    assert labels["sieve_cache_available"] == {"backend"}
    matchers = set().union(*map(promql_label_matchers, all_exprs()))
    assert ("sieve_cache_available", "backend") in matchers
    wrong = {(metric, label) for metric, label in matchers
             if metric in labels and label not in labels[metric] | TARGET_LABELS}
    assert wrong == set(), "deploy/ selects on labels the service never sets"


def test_every_sieve_metric_is_charted_or_alerted():
    used = set().union(*map(promql_metric_names, all_exprs()))
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
    assert {"SieveDown", "SieveWriters", "SieveHighErrorRatio", "SieveHighLatencyP99", "SieveIngestLagGrowing",
            "SieveIngestOldestPendingTooOld", "SieveCacheUnavailable", "SieveNotReady",
            "SieveMemoryNearLimit", "SieveCollectionDegraded", "SieveHousekeepingFailing"} <= set(alerts)
    assert all(rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
               for rule in alerts.values())
    (limit,) = [rule["expr"] for rule in alert_rules() if rule.get("record") == "sieve:memory_limit_bytes"]
    assert limit == f"vector({MEMORY_LIMIT_BYTES})"
    # Every process serves, so readiness and the Redis link are watched on the writer and the replicas.
    assert 'job=~"sieve|sieve-writer"' in alerts["SieveNotReady"]["expr"]
    assert "job" not in alerts["SieveCacheUnavailable"]["expr"]


def test_alerts_select_the_jobs_that_prometheus_scrapes():
    alerted = set()
    for expr in all_exprs():
        for values in re.findall(r'job=~?"([^"]+)"', expr):
            alerted.update(values.split("|"))
    assert alerted == set(JOBS.values())
    # compose: the replicas found through Docker's DNS (any --scale), the writer by name.
    config = load_yaml(PROMETHEUS / "prometheus.yml")[0]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(JOBS.values())
    port = int(compose()["services"]["sieve"]["environment"]["SIEVE_METRICS_PORT"])
    (replicas,) = jobs["sieve"]["dns_sd_configs"]
    assert (replicas["names"], replicas["type"], replicas["port"]) == (["sieve"], "A", port)
    assert jobs["sieve-writer"]["static_configs"] == [{"targets": [f"sieve-writer:{port}"]}]
    # Kubernetes: the component label of each Deployment becomes the job the rules expect.
    (pods,) = load_yaml(PROMETHEUS / "prometheus-kubernetes.yml")[0]["scrape_configs"]
    component = "__meta_kubernetes_pod_label_app_kubernetes_io_component"
    relabelled = {rule["regex"]: rule["replacement"] for rule in pods["relabel_configs"]
                  if rule.get("target_label") == "job" and rule["source_labels"] == [component]}
    assert relabelled == JOBS and set(deployments()) == set(JOBS)
    for path in ("prometheus.yml", "prometheus-kubernetes.yml"):
        assert all((PROMETHEUS / rules).is_file() for rules in load_yaml(PROMETHEUS / path)[0]["rule_files"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (apt-get install prometheus)")
@pytest.mark.parametrize("command", [["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                                     ["check", "config", "prometheus-kubernetes.yml"],
                                     ["test", "rules", "alerts.test.yml"]], ids=" ".join)
def test_promtool(command):
    result = subprocess.run(["promtool", *command], cwd=PROMETHEUS, capture_output=True, text=True)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


# Kubernetes --------------------------------------------------------------------------------------
def test_k8s_has_every_kind_and_kustomization_lists_every_manifest():
    assert sorted(manifests()) == sorted([
        ("ConfigMap", "sieve-config"), ("Deployment", "sieve"), ("Deployment", "sieve-writer"),
        ("HorizontalPodAutoscaler", "sieve"), ("PersistentVolumeClaim", "sieve-data"),
        ("PodDisruptionBudget", "sieve"), ("Secret", "sieve-secrets"), ("Service", "sieve"),
        ("Service", "sieve-writer")])
    assert all("namespace" not in m["metadata"] for m in manifests().values())
    listed = set(load_yaml(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomization")
def test_kustomization_renders():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)}
    assert rendered == set(manifests()) - {("Secret", "sieve-secrets")}


@pytest.mark.parametrize("role, readiness", [("reader", "sieve.v1.SearchService"),
                                             ("writer", "sieve.v1.IngestService")])
def test_probes_use_grpc_health_on_the_service_port(role, readiness):
    deployment = deployments()[role]
    server = container(deployment)
    config = manifests()[("ConfigMap", "sieve-config")]["data"]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"grpc": int(config["SIEVE_PORT"]), "metrics": int(config["SIEVE_METRICS_PORT"])}
    assert server["args"] == ["serve"]
    probes = {kind: server[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    assert all(probe["grpc"]["port"] == ports["grpc"] for probe in probes.values())
    assert {probe["grpc"].get("service", "") for probe in probes.values()} <= HEALTH_NAMES - {"sieve.redis"}
    assert probes["readiness"]["grpc"]["service"] == readiness
    startup = probes["startup"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "models need ~20 s; leave room"
    liveness = probes["liveness"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > DEFAULTS.drain_seconds, "a drain is not death"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > DEFAULTS.drain_seconds + 5


def test_one_writer_and_read_only_replicas_share_the_volume():
    found = manifests()
    reader, writer = deployments()["reader"], deployments()["writer"]
    assert writer["metadata"]["name"] == "sieve-writer" and reader["metadata"]["name"] == "sieve"
    assert writer["spec"]["replicas"] == 1 and writer["spec"]["strategy"]["type"] == "Recreate"
    hpa = found[("HorizontalPodAutoscaler", "sieve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sieve"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "cpu" in container(reader)["resources"]["requests"]
    assert "replicas" not in reader["spec"], "the HPA owns the replica count"
    assert found[("PodDisruptionBudget", "sieve")]["spec"]["selector"]["matchLabels"] == \
        reader["spec"]["template"]["metadata"]["labels"]
    for service, deployment in (("sieve", reader), ("sieve-writer", writer)):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == pod_labels
        spec = found[("Service", service)]["spec"]
        assert spec["selector"] == pod_labels
        ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
        assert {(p["port"], p["targetPort"]) for p in spec["ports"]} == {(n, name) for name, n in ports.items()}
    assert found[("PersistentVolumeClaim", "sieve-data")]["spec"]["accessModes"] == ["ReadWriteMany"]

    def data_mount(deployment):
        (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == "sieve-data"
        (mount,) = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == found[("ConfigMap", "sieve-config")]["data"]["SIEVE_DATA"]
        return mount
    assert data_mount(reader)["readOnly"] is True and not data_mount(writer).get("readOnly")


def test_k8s_settings_are_what_the_server_reads(monkeypatch):
    found = manifests()
    assert set(found[("ConfigMap", "sieve-config")]["data"]) <= CONFIG_VARIABLES
    secret = found[("Secret", "sieve-secrets")]["stringData"]
    for role, read_only in (("reader", True), ("writer", False)):
        spec = deployments()[role]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        env = container(deployments()[role])["env"]
        assert {variable["name"] for variable in env} <= CONFIG_VARIABLES
        secret_keys = [variable["valueFrom"]["secretKeyRef"]["key"] for variable in env if "valueFrom" in variable]
        assert secret_keys and set(secret_keys) <= set(secret)
        (secret_volume,) = [v["secret"] for v in spec["volumes"] if "secret" in v]
        assert all(item["key"] in secret for item in secret_volume["items"])
        assert container(deployments()[role])["resources"]["limits"]["memory"] == "4Gi"  # = MEMORY_LIMIT
        config = server_config(k8s_environment(role), monkeypatch)
        assert config.read_only is read_only and config.host == "0.0.0.0" and config.metrics_port == 9100
        assert config.redis_url and config.refresh_seconds == DEFAULTS.refresh_seconds


@pytest.mark.parametrize("environment, message", [
    ({"SIEVE_MAX_QUEUED_RERANK_PAIRS": "-1"}, "SIEVE_MAX_QUEUED_RERANK_PAIRS must be at least 1"),
    ({"SIEVE_MAX_K": "0"}, "SIEVE_MAX_K must be at least 1"),
    ({"SIEVE_CACHE_TTL_SECONDS": "0"}, "SIEVE_CACHE_TTL_SECONDS must be at least 1"),
    ({"SIEVE_PORT": "fifty"}, "SIEVE_PORT='fifty' is not an integer"),
    ({"SIEVE_PORT": "70000"}, "ports must be in 1-65535"),
    ({"SIEVE_DRAIN_SECONDS": "nan"}, "SIEVE_DRAIN_SECONDS must be a finite number >= 0"),
    ({"SIEVE_BATCH_WAIT_MS": "inf"}, "SIEVE_BATCH_WAIT_MS must be a finite number >= 0"),
    ({"SIEVE_REFRESH_SECONDS": "0"}, "SIEVE_REFRESH_SECONDS must be above 0"),
    ({"SIEVE_DEFAULT_K": "20", "SIEVE_MAX_K": "10"}, "SIEVE_DEFAULT_K (20) is above SIEVE_MAX_K (10)"),
    ({"SIEVE_LOG_FORMAT": "xml"}, "SIEVE_LOG_FORMAT must be text or json"),
    ({"SIEVE_TLS_CERT": "server.pem"}, "set SIEVE_TLS_CERT and SIEVE_TLS_KEY together"),
    ({"SIEVE_READ_ONLY": "maybe"}, "is not a boolean"),
])
def test_bad_settings_are_refused_by_name(environment, message, monkeypatch):
    with pytest.raises(ValueError, match=re.escape(message)):
        server_config(environment, monkeypatch)


def test_serve_with_a_bad_setting_exits_with_its_message(tmp_path):
    env = {**os.environ, "SIEVE_DATA": str(tmp_path), "SIEVE_MAX_QUEUED_RERANK_PAIRS": "-5"}
    done = subprocess.run([sys.executable, "-m", "sieve.service.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "sieve serve: SIEVE_MAX_QUEUED_RERANK_PAIRS must be at least 1, got -5" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_readme_lists_every_setting():
    rows = re.findall(r"^\| (`SIEVE_.*?) \|", (DEPLOY / "README.md").read_text(), re.M)
    assert set(re.findall(r"`(SIEVE_\w+)`", " ".join(rows))) == CONFIG_VARIABLES


def key_of_scope(scope: str) -> str:
    return {key_scope: key for key, key_scope in load_keys(API_KEYS_EXAMPLE).items()}[scope]


def test_the_example_api_keys_parse(tmp_path):
    assert sorted(load_keys(API_KEYS_EXAMPLE).values()) == ["read", "write"]
    assert "\n#" in API_KEYS_EXAMPLE.read_text()  # explained in place: the parser skips comments
    secret = tmp_path / "api-keys"
    secret.write_text(manifests()[("Secret", "sieve-secrets")]["stringData"]["api-keys"])
    assert load_keys(secret) == load_keys(API_KEYS_EXAMPLE)


def test_k8s_manifests_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for (kind, name), document in manifests().items():
        kubernetes_validate.validate(document, "1.30.0", strict=True)


# Compose and images ------------------------------------------------------------------------------
def test_compose_runs_one_writer_and_scalable_read_only_replicas(monkeypatch):
    file = compose()
    services = file["services"]
    assert set(services) == {"sieve", "sieve-writer", "redis", "prometheus", "grafana"}
    for name, read_only in (("sieve", True), ("sieve-writer", False)):
        service = services[name]
        assert service["command"] == ["serve"]
        assert set(service["environment"]) <= CONFIG_VARIABLES
        config = server_config(service["environment"], monkeypatch)
        assert config.read_only is read_only and config.redis_url.startswith("redis://redis:")
        assert service["volumes"] == [f"sieve-data:{config.data}" + (":ro" if read_only else "")]
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["mem_limit"] == "4g"  # = MEMORY_LIMIT_BYTES
        assert all(secret in file["secrets"] for secret in service["secrets"])
        assert service["environment"]["SIEVE_REDIS_PASSWORD"] in services["redis"]["command"]
    assert "--requirepass" in services["redis"]["command"]
    assert all(":" not in str(port) for port in services["sieve"]["ports"]), "a fixed host port stops --scale"
    assert "deploy" not in services["sieve-writer"], "exactly one writer"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DEPLOY / source).exists(), f"{name}: {source} is missing"
            assert source.startswith(".") or source in file["volumes"]
    assert (DEPLOY / file["secrets"]["sieve-api-keys"]["file"]).with_suffix(".example") == API_KEYS_EXAMPLE
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


# The manifests' settings run real servers --------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A writer and a read replica as k8s/ configures them, on one data folder, Redis unreachable."""
    data = tmp_path_factory.mktemp("volume") / "data"
    local = {"SIEVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "SIEVE_API_KEYS_FILE": str(API_KEYS_EXAMPLE),
             "SIEVE_REDIS_PASSWORD": "unused", "SIEVE_DRAIN_SECONDS": "2"}
    processes = {}
    for role in ("writer", "reader"):
        environment = {name: value for name, value in k8s_environment(role).items()
                       if name not in ("SIEVE_DATA", "SIEVE_PORT", "SIEVE_HOST")}  # ServerProcess sets these
        environment.update(local, SIEVE_METRICS_PORT=str(free_port()))
        processes[role] = ServerProcess(data, environment)
    try:
        for process in processes.values():
            process.start()
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def test_healthcheck_answers_for_every_probed_name_and_redis(cluster):
    port = str(cluster["reader"].port)
    for name in HEALTH_NAMES - {"sieve.redis"}:
        assert run_healthcheck(name, SIEVE_PORT=port).returncode == 0, name
    away = run_healthcheck("sieve.redis", SIEVE_PORT=port)  # Redis is down; the server still serves
    assert away.returncode == 1 and "NOT_SERVING" in away.stderr
    unknown = run_healthcheck("sieve.v1.Nothing", SIEVE_PORT=port)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    closed = run_healthcheck(SIEVE_PORT=str(free_port()))
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr


def test_every_process_exports_readiness_and_the_redis_gauge(cluster):
    for process in cluster.values():
        url = f"http://127.0.0.1:{process.env['SIEVE_METRICS_PORT']}/metrics"
        deadline = time.time() + 10  # the Redis gauge appears after the first failed ping
        while True:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            if 'sieve_cache_available{backend="redis"} 0.0' in text or time.time() > deadline:
                break
            time.sleep(0.2)
        assert "\nsieve_ready 1.0" in text
        assert 'sieve_cache_available{backend="redis"} 0.0' in text


def test_the_replica_refuses_writes_and_follows_the_writer(cluster):
    from sieve.service.client import SieveClient

    read_key, write_key = key_of_scope("read"), key_of_scope("write")
    with SieveClient(cluster["reader"].target, api_key=write_key) as reader:
        with pytest.raises(grpc.RpcError) as refused:
            reader.create_collection("from-the-reader", {})
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in refused.value.details()
    with SieveClient(cluster["writer"].target, api_key=read_key) as writer:
        with pytest.raises(grpc.RpcError) as denied:
            writer.create_collection("by-a-reader-key", {})
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with SieveClient(cluster["writer"].target, api_key=write_key) as writer:
        writer.create_collection("shared", {})
    refresh = float(cluster["reader"].env["SIEVE_REFRESH_SECONDS"])
    deadline = time.time() + 3 * refresh + 5
    with SieveClient(cluster["reader"].target, api_key=read_key) as reader:
        while "shared" not in {c.name for c in reader.list_collections().collections}:
            assert time.time() < deadline, "the replica never picked up the writer's collection"
            time.sleep(0.2)


# Sharded deployment ------------------------------------------------------------------------------
K8S_SHARDED = DEPLOY / "k8s-sharded"


def sharded_manifests() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for path in sorted(K8S_SHARDED.glob("*.yaml"))
            for d in load_yaml(path) if d.get("kind") not in (None, "Kustomization")}


def test_sharded_k8s_runs_shard_writers_behind_a_router(monkeypatch):
    from sieve.service.router import shard_addresses

    found = sharded_manifests()
    assert set(found) == {("ConfigMap", "sieve-sharded-config"), ("Service", "sieve-shards"),
                          ("StatefulSet", "sieve-shard"), ("Deployment", "sieve-router"), ("Service", "sieve-router"),
                          ("HorizontalPodAutoscaler", "sieve-router")}
    listed = set(load_yaml(K8S_SHARDED / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in K8S_SHARDED.glob("*.yaml")} - {"kustomization.yaml"}
    shards, router = found[("StatefulSet", "sieve-shard")], found[("Deployment", "sieve-router")]
    headless = found[("Service", "sieve-shards")]
    assert headless["spec"]["clusterIP"] == "None" and shards["spec"]["serviceName"] == "sieve-shards"
    assert len(shards["spec"]["volumeClaimTemplates"]) == 1, "one volume per shard"
    config = found[("ConfigMap", "sieve-sharded-config")]["data"]
    env = {v["name"]: v["value"] for v in container(router)["env"] if "value" in v}
    pods = [f"sieve-shard-{n}.sieve-shards:{config['SIEVE_PORT']}" for n in range(shards["spec"]["replicas"])]
    assert shard_addresses(env["SIEVE_SHARDS"]) == pods
    assert server_config({**config, **env}, monkeypatch).shards == env["SIEVE_SHARDS"]
    assert not server_config(config, monkeypatch).shards  # the shards serve their own data
    secret_keys = {v["valueFrom"]["secretKeyRef"]["key"] for v in container(router)["env"] if "valueFrom" in v}
    assert secret_keys <= set(manifests()[("Secret", "sieve-secrets")]["stringData"])
    readiness = {name: container(m)["readinessProbe"]["grpc"]["service"] for name, m in
                 (("shard", shards), ("router", router))}
    assert readiness == {"shard": "sieve.v1.ShardService", "router": "sieve.v1.SearchService"}
    assert set(readiness.values()) <= HEALTH_NAMES
    hpa = found[("HorizontalPodAutoscaler", "sieve-router")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sieve-router", "never autoscale the shards"


def test_sharded_compose_runs_three_shards_and_a_router(monkeypatch):
    from sieve.service.router import shard_addresses

    services = load_yaml(DEPLOY / "compose.sharded.yaml")[0]["services"]
    assert set(services) == {"shard-0", "shard-1", "shard-2", "router"}
    router = services["router"]
    environment = {k: v for k, v in router["environment"].items() if not str(v).startswith("${")}
    config = server_config(environment, monkeypatch)
    assert [address.split(":")[0] for address in shard_addresses(config.shards)] == ["shard-0", "shard-1", "shard-2"]
    volumes = [services[f"shard-{n}"]["volumes"][0].split(":")[0] for n in range(3)]
    assert len(set(volumes)) == 3, "each shard its own volume"
    assert all(set(service["environment"]) <= CONFIG_VARIABLES for service in services.values())
