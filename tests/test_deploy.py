"""The deployment files agree with the code: deploy/Dockerfile, deploy/compose.yaml, deploy/k8s/, the
Grafana provisioning and the Prometheus configs. Every YAML file parses; every flag and LORABUS_*
variable they set is one the worker reads (the settings each worker would run with are parsed by the
real `lorabus worker` parser); every lorabus_* metric they name is exported; ports, probes, grace
periods, topic settings and the KEDA trigger match the code's defaults; adapters come from the object store
(the store's service and credentials, a bounded disk tier) with no shared volume required. No Docker,
cluster or broker."""

import ast
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorabus.scheduler import Engine, EngineConfig
from lorabus.worker import cli
from lorabus.worker.cli import flags
from lorabus.worker.config import WorkerConfig
from lorabus.worker.health import HealthChecks
from lorabus.worker.metrics import Metrics
from lorabus.worker.output import OUTPUT_COUNTERS
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, STATUS_TOPIC_CONFIGS, control_topic_problems

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
# Every deployment file but the demo adapters (training data and weights, not deployment).
DEPLOY_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "demo-adapters" not in p.parts
                      and (p.suffix in (".yaml", ".yml", ".json") or p.name == "Dockerfile"))
YAML_FILES = [p for p in DEPLOY_FILES if p.suffix in (".yaml", ".yml")]
DEFAULTS = WorkerConfig()
METRICS_PORT = DEFAULTS.metrics_port
SASL_TO_KEDA = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


# ---- reading the files ------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s() -> dict[tuple[str, str], dict]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def comment_flags(path: Path) -> set[str]:
    """`--flags` the comments name, except on lines that show a docker or kubectl command (their own flags)."""
    lines = [m.group(1) for line in path.read_text().splitlines() if (m := re.search(r"(?:^|\s)#(.*)", line))]
    return {flag for line in lines if not re.search(r"\b(docker|kubectl) ", line)
            for flag in re.findall(r"--[a-z][a-z0-9-]*", line)}


def worker_services() -> dict[str, dict]:
    services = compose()["services"].items()
    return {name: s for name, s in services if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def worker_container() -> dict:
    (container,) = k8s()[("Deployment", "lorabus-worker")]["spec"]["template"]["spec"]["containers"]
    return container


def config_map() -> dict[str, str]:
    return k8s()[("ConfigMap", "lorabus-config")]["data"]


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("24Gi", "512Mi", "1G", "100")."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", quantity).groups()
    return int(number) * (1024 if unit and unit.endswith("i") else 1000) ** ("KMGT".index(unit[0]) + 1 if unit else 0)


def secret_refs(container: dict) -> set[tuple[str, str, str]]:
    """(variable, Secret, key) of the variables a container takes from Secrets."""
    return {(item["name"], item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
            for item in container["env"] if "secretKeyRef" in item.get("valueFrom", {})}


def flags_in(words) -> set[str]:
    return {word for word in (shlex.split(words) if isinstance(words, str) else words or []) if word.startswith("--")}


def worker_parser_flags() -> set[str]:
    worker = _subcommands(cli.build_parser())["worker"]
    return {option for action in worker._actions for option in action.option_strings}


def _subcommands(parser) -> dict:
    return next(a.choices for a in parser._actions if a.choices and isinstance(a.choices, dict))


def known_variables() -> set[str]:
    """LORABUS_* names the code reads: those its flags' help names, and string constants in its source."""
    names = set()
    parsers = [cli.build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            names.update(re.findall(r"\[env (LORABUS_[A-Z0-9_]+)", action.help or ""))
            if isinstance(action.choices, dict):
                parsers.extend(action.choices.values())
    for package in ("schemas", "kernels", "scheduler", "worker"):
        for source in (ROOT / package).glob("*.py"):
            names.update(node.value for node in ast.walk(ast.parse(source.read_text()))
                         if isinstance(node, ast.Constant) and isinstance(node.value, str)
                         and re.fullmatch(r"LORABUS_[A-Z0-9_]+", node.value))
    return names


def topic_calls(script: str, env: dict[str, str]) -> dict[str, tuple[int, dict[str, str]]]:
    """`topic NAME PARTITIONS [--config k=v]...` lines of a topic-setup script: name -> (partitions, configs)."""
    topics = {}
    for line in script.replace("$$", "$").replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] != ["topic"]:
            continue
        name, partitions, rest = words[1], words[2], words[3:]
        partitions = env[partitions[1:]] if partitions.startswith("$") else partitions
        assert rest[::2] == ["--config"] * (len(rest) // 2), line
        topics[name] = (int(partitions), dict(item.split("=", 1) for item in rest[1::2]))
    return topics


def worker_config(monkeypatch, env: dict[str, str], args: list[str]) -> WorkerConfig:
    """The settings a worker started with this environment and these arguments runs with."""
    for name in [n for n in os.environ if n.startswith("LORABUS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    parsed = cli.build_parser().parse_args(["worker", *args])  # an unknown flag exits here
    for value in vars(parsed).values():  # a LORABUS_* value of the wrong type
        assert type(value).__name__ != "_BadEnv", value
    return flags._config_from(parsed)


# ---- the tests --------------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    assert {COMPOSE, DEPLOY / "prometheus" / "compose-prometheus.yml"} <= set(YAML_FILES)
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    kinds = {kind for kind, _ in k8s()}
    assert {"ConfigMap", "Deployment", "Service", "Job", "ScaledObject", "TriggerAuthentication",
            "ServiceMonitor", "PersistentVolumeClaim", "Secret"} <= kinds
    for (kind, name), doc in k8s().items():
        assert doc["apiVersion"] and name.startswith("lorabus"), (kind, name)


def test_flags_and_variables_are_the_workers():
    flags = worker_parser_flags()
    used = set()
    for instruction, rest in dockerfile():
        if instruction in ("ENTRYPOINT", "CMD"):
            used |= flags_in(yaml.safe_load(rest))
    for service in worker_services().values():
        used |= flags_in(service.get("command")) | flags_in(service.get("entrypoint"))
    used |= flags_in(worker_container().get("args")) | flags_in(worker_container().get("command"))
    for path in DEPLOY_FILES:  # flags the comments tell an operator to change
        if path.suffix != ".json":
            used.update(comment_flags(path))
    assert {"--drain-timeout-ms", "--device"} <= used
    assert used <= flags, f"not `lorabus worker` flags: {sorted(used - flags)}"

    variables = known_variables()
    named = {name for path in DEPLOY_FILES for name in re.findall(r"LORABUS_[A-Z0-9_]+", path.read_text())}
    assert {"LORABUS_METRICS_HOST", "LORABUS_SASL_PASSWORD", "LORABUS_BOOTSTRAP_SERVERS"} <= named
    assert named <= variables, f"variables lorabus never reads: {sorted(named - variables)}"


def test_image_settings_parse_as_a_worker(monkeypatch):
    env = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            env.update(dict(shlex.split(item)[0].split("=", 1) for item in re.findall(r'\S+=(?:"[^"]*"|\S+)', rest)))
    config = worker_config(monkeypatch, {k: v for k, v in env.items() if k.startswith("LORABUS_")}, [])
    assert config.metrics_host == "0.0.0.0" and config.metrics_port == METRICS_PORT
    instructions = dict(dockerfile())
    assert yaml.safe_load(instructions["ENTRYPOINT"]) == ["lorabus", "worker"]
    assert instructions["USER"].split(":")[0] not in ("0", "root")
    assert {int(p.split("/")[0]) for p in instructions["EXPOSE"].split()} == {METRICS_PORT}
    assert "/healthz" in instructions["HEALTHCHECK"]


def test_dockerfile_copies_every_package():
    copied = {src for instruction, rest in dockerfile() if instruction == "COPY" for src in rest.split()[:-1]}
    for source in copied:
        assert (ROOT / source).exists(), source
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(packages.values()) <= copied, "a package the wheel needs is not copied into the image"
    assert {"pyproject.toml", "README.md"} <= copied


def test_k8s_worker_settings_parse(monkeypatch):
    container = worker_container()
    env = dict(config_map())
    for item in container["env"]:
        env[item["name"]] = item.get("value", "from-" + next(iter(item["valueFrom"])))
    config = worker_config(monkeypatch, env, container["args"])
    assert config.engine.device == "cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config.bootstrap_servers == config_map()["LORABUS_BOOTSTRAP_SERVERS"]
    assert config.security.security_protocol == "SASL_SSL" and config.security.sasl_password == "from-secretKeyRef"
    assert ("LORABUS_SASL_PASSWORD", "lorabus-kafka", "password") in secret_refs(container)
    assert {"configMapRef": {"name": "lorabus-config"}} in container["envFrom"]


def test_k8s_workers_fetch_adapters_from_the_store_without_a_shared_volume(monkeypatch):
    objects, container = k8s(), worker_container()
    secret = objects[("Secret", "lorabus-store")]
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # boto3's chain, no flags
    assert {"secretRef": {"name": "lorabus-store"}} in container["envFrom"]
    env = {**config_map(), **{item["name"]: item.get("value", "x") for item in container["env"]}}
    config = worker_config(monkeypatch, env, container["args"])
    assert config.s3_endpoint_url == config_map()["LORABUS_S3_ENDPOINT_URL"] and config.s3_endpoint_url
    assert config.s3_addressing_style in flags.ADDRESSING_STYLES
    # The disk tier is a volume of the pod's own, larger than the tier's bound (downloads may overshoot it).
    spec = objects[("Deployment", "lorabus-worker")]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    tier = volumes[mounts[config.adapter_disk_cache_dir]]
    assert quantity_bytes(tier["emptyDir"]["sizeLimit"]) > config.adapter_disk_cache_bytes
    # The ReadWriteMany volume stays an option: defined, but no pod needs it.
    assert objects[("PersistentVolumeClaim", "lorabus-adapters")]["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [d["spec"]["template"]["spec"] for d in objects.values() if "template" in d.get("spec", {})]
    assert len(pods) == 2 and not [v for pod in pods for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]


def test_compose_workers_fetch_adapters_from_its_store(monkeypatch):
    services = compose()["services"]
    store = services["s3"]
    assert store["image"].startswith("andrewgaul/s3proxy:") and store["environment"]["JCLOUDS_PROVIDER"] == "filesystem"
    store_port = store["environment"]["S3PROXY_ENDPOINT"].rsplit(":", 1)[1]
    upload = services["adapters-upload"]
    for name, service in [*worker_services().items(), ("adapters-upload", upload)]:
        env = service["environment"]
        assert env["LORABUS_S3_ENDPOINT_URL"] == f"http://s3:{store_port}", name
        # The keys the store is started with, from the same shell variables.
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            store["environment"]["S3PROXY_IDENTITY"], store["environment"]["S3PROXY_CREDENTIAL"]), name
    for service in worker_services().values():
        config = worker_config(monkeypatch, service["environment"], service.get("command", []))
        assert config.s3_addressing_style == "path"  # S3Proxy's addresses
        assert 0 < config.adapter_disk_cache_bytes and "volumes" not in service  # nothing shared between workers
    assert upload["image"] == next(iter(worker_services().values()))["image"]  # boto3 and the demo adapters
    assert "adapters/" in upload["command"][0] and "/v1/" in upload["command"][0]


def test_compose_worker_settings_parse(monkeypatch):
    services = worker_services()
    assert len(services) == 2
    instance_ids = set()
    for name, service in services.items():
        config = worker_config(monkeypatch, service["environment"], service.get("command", []))
        assert config.bootstrap_servers.split(":")[0] in compose()["services"]
        instance_ids.add(config.group_instance_id)
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert len(instance_ids) == 2 and "" not in instance_ids  # static membership needs distinct ids


def test_ports_and_probes_match_the_metrics_port():
    pages = set(HealthChecks(None).pages())
    container = worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    assert {p["path"] for p in probes.values()} <= pages
    assert all(ports.get(p["port"], p["port"]) == METRICS_PORT for p in probes.values())
    template = k8s()[("Deployment", "lorabus-worker")]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    service = k8s()[("Service", "lorabus-worker-metrics")]
    (port,) = service["spec"]["ports"]
    assert port["port"] == METRICS_PORT and ports.get(port["targetPort"], port["targetPort"]) == METRICS_PORT
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    monitor = k8s()[("ServiceMonitor", "lorabus-worker")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [port["name"]]

    services = worker_services()
    for service in services.values():
        assert [int(p.rsplit(":", 1)[1]) for p in service["ports"]] == [METRICS_PORT]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "compose-prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:{METRICS_PORT}" for name in services}


def test_grace_periods_cover_the_drain():
    stop_s = EngineConfig().stop_timeout_s
    drain_ms = int(config_map().get("LORABUS_DRAIN_TIMEOUT_MS", DEFAULTS.drain_timeout_ms))
    grace = k8s()[("Deployment", "lorabus-worker")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain_ms / 1000 + stop_s + 10, "SIGKILL would cut the drain short"
    for service in worker_services().values():
        drain_ms = int(service["environment"].get("LORABUS_DRAIN_TIMEOUT_MS", DEFAULTS.drain_timeout_ms))
        assert int(service["stop_grace_period"].rstrip("s")) >= drain_ms / 1000 + stop_s + 10


def test_topic_setup_creates_the_workers_topics():
    (job_container,) = k8s()[("Job", "lorabus-topics")]["spec"]["template"]["spec"]["containers"]
    job_env = {**config_map(), **{e["name"]: e.get("value") for e in job_container["env"]}}
    setup = compose()["services"]["topics"]
    scripts = {"k8s": (job_container["args"][0], job_env), "compose": (setup["command"][0], setup["environment"])}
    keda = k8s()[("ScaledObject", "lorabus-worker")]["spec"]
    for where, (script, env) in scripts.items():
        topics = topic_calls(script, env)
        assert set(topics) == {DEFAULTS.jobs_topic, DEFAULTS.results_topic, DEFAULTS.control_topic,
                               DEFAULTS.status_topic, DEFAULTS.dlq_topic}, where
        partitions, configs = topics[DEFAULTS.control_topic]
        assert (partitions, configs) == (1, CONTROL_TOPIC_CONFIGS), where
        assert control_topic_problems(configs, partitions) == []
        assert topics[DEFAULTS.status_topic] == (1, STATUS_TOPIC_CONFIGS), where
        fleet = keda["maxReplicaCount"] if where == "k8s" else len(worker_services())
        assert topics[DEFAULTS.jobs_topic][0] >= fleet, f"{where}: fewer jobs partitions than workers"
    k8s_partitions = topic_calls(*scripts["k8s"])[DEFAULTS.jobs_topic][0]
    assert int(config_map()["LORABUS_TOPIC_PARTITIONS"]) == k8s_partitions == 48
    compose_partitions = topic_calls(*scripts["compose"])[DEFAULTS.jobs_topic][0]
    for service in worker_services().values():
        assert int(service["environment"]["LORABUS_TOPIC_PARTITIONS"]) == compose_partitions


def test_keda_scales_on_the_jobs_group_lag():
    objects = k8s()
    spec = objects[("ScaledObject", "lorabus-worker")]["spec"]
    assert spec["scaleTargetRef"]["name"] == "lorabus-worker" and ("Deployment", "lorabus-worker") in objects
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    meta, settings = trigger["metadata"], config_map()
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == settings.get("LORABUS_GROUP_ID", DEFAULTS.group_id)
    assert meta["topic"] == settings.get("LORABUS_JOBS_TOPIC", DEFAULTS.jobs_topic)
    assert meta["bootstrapServers"] == settings["LORABUS_BOOTSTRAP_SERVERS"]
    assert meta["offsetResetPolicy"] == settings.get("LORABUS_AUTO_OFFSET_RESET", DEFAULTS.auto_offset_reset)
    # A worker that keeps up holds up to --max-inflight uncommitted records: below that the fleet always grows.
    assert int(meta["lagThreshold"]) > int(settings.get("LORABUS_MAX_INFLIGHT", DEFAULTS.max_inflight))
    protocol = settings["LORABUS_SECURITY_PROTOCOL"]
    assert meta.get("tls", "disable") == ("enable" if protocol.endswith("SSL") else "disable")
    if protocol.startswith("SASL_"):
        assert meta["sasl"] == SASL_TO_KEDA[settings["LORABUS_SASL_MECHANISM"]]
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]["secretTargetRef"]
    worker_secrets = {(secret, key) for _, secret, key in secret_refs(worker_container())}
    assert {(ref["name"], ref["key"]) for ref in auth} == worker_secrets  # one Secret for workers and KEDA


def test_grafana_provisioning_matches_compose():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_target = mounts["./grafana/lorabus.json"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "lorabus.yaml").read_text())["providers"]
    assert provider["type"] == "file" and dashboard_target.startswith(provider["options"]["path"] + "/")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in compose()["services"]["prometheus"]["ports"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "compose-prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]  # $__rate_interval's base
    prometheus_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose()["services"]["prometheus"]["volumes"])
    for source_path in [*mounts, *prometheus_mounts]:
        assert (DEPLOY / source_path).exists(), source_path


@pytest.fixture
def exported_metrics(tiny_model) -> set[str]:
    """Every series name a worker can export: its registry, the engine's gauges and the output counters."""
    metrics = Metrics()
    metrics.watch_engine(Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).stats)
    metrics.watch_output(lambda: dict.fromkeys(OUTPUT_COUNTERS, 0))
    metrics.watch_lanes(lambda: {"jobs": 1})
    metrics.lane_taken("jobs", 0)
    metrics.lane_tokens.labels("jobs").inc()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": (), "info": ("_info",), "summary": ("_sum", "_count", "_created")}
    names = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        names.update([family.name, *(family.name + s for s in suffixes.get(family.type, ()))])
    assert len(OUTPUT_COUNTERS) >= 4
    return names


def test_metrics_named_in_deploy_files_are_exported(exported_metrics):
    named = {(path.relative_to(DEPLOY).as_posix(), name) for path in DEPLOY_FILES
             for name in re.findall(r"lorabus_[a-z_]+", path.read_text())}
    assert {name for _, name in named} >= {"lorabus_consumer_lag", "lorabus_jobs_completed_total"}
    missing = sorted((path, name) for path, name in named if name not in exported_metrics)
    assert not missing, f"metrics no worker exports: {missing}"
