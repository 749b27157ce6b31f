"""The production stack definition: docker-compose.yml, its gpufleet config, Dockerfile, Alertmanager config.

No Docker here, so these read the files: every service the code needs is present, images are
pinned, every long-running service has a healthcheck, host ports sit on 127.0.0.1, secrets are
required variables (never literals), and every address in deploy/compose/gpufleet.yaml names a
service and port that exist in the compose file. Where the validators are installed, the compose
file is also checked against the Compose Specification and the Alertmanager config with amtool.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gpufleet.cli import COMMANDS
from gpufleet.config import Config, load
from gpufleet.version import __version__

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPUFLEET_CONFIG = ROOT / "deploy" / "compose" / "gpufleet.yaml"
AGENT_SIMS = {"agent-sim-1": "deploy/compose/agent-sim-1.yaml", "agent-sim-2": "deploy/compose/agent-sim-2.yaml"}
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_TEMPLATES = ROOT / "deploy" / "alertmanager" / "templates" / "gpufleet.tmpl"
KAFKA_CLUSTER = ROOT / "deploy" / "compose" / "kafka-cluster.yml"
CLICKHOUSE_USERS = ROOT / "deploy" / "clickhouse" / "users.d" / "gpufleet.xml"
CLICKHOUSE_CONFIG = ROOT / "deploy" / "clickhouse" / "config.d" / "gpufleet.xml"
CLICKHOUSE_ENTRYPOINT = ROOT / "deploy" / "clickhouse" / "entrypoint.sh"
CONFIG_IN_CONTAINER = "/etc/gpufleet/gpufleet.yaml"

REQUIRED_SERVICES = {"kafka", "clickhouse", "migrate", "ingester", "alerts", "alertmanager", "grafana"}
ONE_SHOTS = {"migrate", "kafka-init"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
REQUIRED_REF = re.compile(r"\$\{([A-Z][A-Z0-9_]*):\?[^}]+\}")
EXACT_VERSION = re.compile(r"^v?\d+\.\d+\.\d+(\.\d+)?$")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def config() -> Config:
    return load(GPUFLEET_CONFIG)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def host_port_bindings(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, host_port, container_port) for each published port; host_ip '' when unbound."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])))
            continue
        parts = str(port).rsplit(":", 2) if str(port).count(":") >= 2 else str(port).split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append(("", "", parts[0]))
    return out


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service listens on inside the compose network (`expose` and published targets)."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose") or []}
    ports |= {int(c.split("/")[0]) for _, _, c in host_port_bindings(service)}
    return ports


def image_tag(image: str) -> str:
    name = image.split("@", maxsplit=1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def gpufleet_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if s["image"].split(":")[0] == "gpufleet"}


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


# --- services and images ---------------------------------------------------------------------------


def test_every_service_the_code_expects_is_present(services: dict[str, dict[str, Any]]) -> None:
    assert services.keys() >= REQUIRED_SERVICES
    agents = [n for n, s in gpufleet_services(services).items() if s["command"][0] == "agent"]
    assert agents, "at least one agent service"


def test_gpufleet_services_run_registered_subcommands(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["command"] == ["migrate"]
    assert services["ingester"]["command"] == ["ingest", "--no-migrate"]
    assert services["alerts"]["command"] == ["alerts", "run"]
    assert services["agent-sim-1"]["command"] == ["agent", "--backend", "simulated", "--nodes", "4", "--seed", "1"]
    assert services["agent-sim-2"]["command"] == ["agent", "--backend", "simulated", "--nodes", "4", "--seed", "2"]
    for name, service in gpufleet_services(services).items():
        assert service["command"][0] in COMMANDS, f"{name}: 'gpufleet {service['command'][0]}' is not a subcommand"


def test_every_image_is_pinned_to_an_exact_version(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        tag = image_tag(service["image"])
        assert tag, f"{name}: image {service['image']} has no tag"
        assert tag != "latest", f"{name}: image {service['image']} is not pinned"
        assert EXACT_VERSION.match(tag), f"{name}: tag {tag!r} is not an exact version"


def test_gpufleet_image_is_built_here_and_tagged_with_the_package_version(
    services: dict[str, dict[str, Any]],
) -> None:
    built = gpufleet_services(services)
    assert set(built) >= {"migrate", "ingester", "alerts", "agent-sim-1", "agent-sim-2"}
    for name, service in built.items():
        assert service["image"] == f"gpufleet:{__version__}", name
        assert service["build"]["dockerfile"] == "Dockerfile", name
        assert (ROOT / service["build"]["context"] / "Dockerfile").is_file()


def test_kafka_and_clickhouse_versions_are_the_chosen_ones(services: dict[str, dict[str, Any]]) -> None:
    kafka = image_tag(services["kafka"]["image"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka.startswith(("3.9.", "4.")), kafka
    clickhouse = image_tag(services["clickhouse"]["image"])
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert clickhouse.startswith(("25.", "26.")), clickhouse
    grafana = image_tag(services["grafana"]["image"])
    assert grafana.startswith(("11.", "12.")), grafana


# --- health and start order ---------------------------------------------------------------------------


def test_every_service_has_a_healthcheck_or_is_a_one_shot(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert service["restart"] == "no", f"{name}: a one-shot must not be restarted"
            assert "healthcheck" not in service, name
            continue
        check = service.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert check["test"], f"{name}: empty healthcheck"
        assert not check.get("disable"), f"{name}: healthcheck disabled"
        assert service["restart"] in ("unless-stopped", "always"), name


def test_depends_on_targets_exist_and_conditions_fit_them(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_completed_successfully":
                assert target in ONE_SHOTS, f"{name}: {target} is not a one-shot"
            else:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"


def test_start_order_matches_the_data_path(services: dict[str, dict[str, Any]]) -> None:
    deps = {name: set(s.get("depends_on") or {}) for name, s in services.items()}
    assert deps["migrate"] >= {"clickhouse"}
    assert deps["ingester"] >= {"kafka", "kafka-init", "clickhouse", "migrate"}
    assert deps["alerts"] >= {"clickhouse", "migrate", "alertmanager"}
    assert deps["grafana"] >= {"clickhouse"}
    for name in ("agent-sim-1", "agent-sim-2"):
        # Topics are not auto-created, so agents wait for them.
        assert deps[name] >= {"kafka", "kafka-init"}
        assert "clickhouse" not in deps[name]


def test_healthchecks_probe_what_the_config_opens(services: dict[str, dict[str, Any]], config: Config) -> None:
    assert f"'http://127.0.0.1:{config.ingest.status_port}/healthz'" in healthcheck_text(services["ingester"])
    assert f"'http://127.0.0.1:{config.alerts.status_port}/healthz'" in healthcheck_text(services["alerts"])
    assert config.alerts.status_port == 8082
    for name, path in AGENT_SIMS.items():
        port = load(ROOT / path).agent.health_port
        assert port == 9410
        assert f"'http://127.0.0.1:{port}/healthz'" in healthcheck_text(services[name]), name


def _run_healthcheck(service: dict[str, Any], replace: tuple[str, str]) -> int:
    """Run a service's `CMD python -c ...` healthcheck here, with one address swapped for a test one."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace(*replace)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=30).returncode


@pytest.mark.integration
def test_ingester_healthcheck_passes_against_the_real_status_api(
    services: dict[str, dict[str, Any]], config: Config
) -> None:
    from gpufleet.embedded.broker import free_port
    from gpufleet.pipeline.queries.status_api import StatusServer

    server = StatusServer(lambda: {}, port=0).start()
    try:
        swap = (f":{config.ingest.status_port}/", f":{server.port}/")
        assert _run_healthcheck(services["ingester"], swap) == 0
    finally:
        server.stop()
    # Nothing listening: the check fails.
    assert _run_healthcheck(services["ingester"], (f":{config.ingest.status_port}/", f":{free_port()}/")) != 0


def test_evaluator_healthcheck_follows_the_health_endpoint(services: dict[str, dict[str, Any]]) -> None:
    from gpufleet.embedded.broker import free_port
    from gpufleet.health_http import HealthServer
    from gpufleet.liveness import Liveness

    clock = [0.0]
    live = Liveness(lambda: clock[0]).expect("evaluated", 120)
    server = HealthServer(live).start()
    try:
        swap = (":8082/", f":{server.port}/")
        assert _run_healthcheck(services["alerts"], swap) == 0
        clock[0] += 121
        assert _run_healthcheck(services["alerts"], swap) != 0  # stale: 503 fails the check
    finally:
        server.stop()
    assert _run_healthcheck(services["alerts"], (":8082/", f":{free_port()}/")) != 0


# --- exposure and secrets --------------------------------------------------------------------------


def test_host_ports_are_bound_to_loopback_only_but_the_fleet_listener(services: dict[str, dict[str, Any]]) -> None:
    published = {}
    for name, service in services.items():
        for host_ip, host_port, container in host_port_bindings(service):
            published.setdefault(name, []).append((host_ip, host_port, container))
    fleet_bind = "${KAFKA_FLEET_BIND:?the private address GPU nodes connect to (in .env)}"
    assert published == {
        "kafka": [("127.0.0.1", "9092", "29092"), (fleet_bind, "9094", "9094")],
        "clickhouse": [("127.0.0.1", "8123", "8123")],
        "alertmanager": [("127.0.0.1", "9093", "9093")],
        "grafana": [("127.0.0.1", "3000", "3000")],
    }


def test_kafka_listeners_fleet_is_sasl_ssl_scram_with_the_keystore_from_secrets(
    services: dict[str, dict[str, Any]],
) -> None:
    env = env_of(services["kafka"])
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert listeners == {"INTERNAL": ":9092", "CONTROLLER": ":9093", "HOST": ":29092", "FLEET": ":9094"}
    assert advertised["HOST"] == "127.0.0.1:9092"
    assert advertised["INTERNAL"] == "kafka:9092"
    assert advertised["FLEET"].startswith("${KAFKA_FLEET_HOST:?")
    assert advertised["FLEET"].endswith(":9094")
    assert protocols == {"INTERNAL": "PLAINTEXT", "CONTROLLER": "PLAINTEXT", "HOST": "PLAINTEXT",
                         "FLEET": "SASL_SSL"}
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["CLUSTER_ID"].startswith("${KAFKA_CLUSTER_ID:?"), "a generated cluster id, never a shared literal"
    # The image takes the keystore and its password as files under /etc/kafka/secrets.
    targets = {s["target"]: s["source"] for s in services["kafka"]["secrets"]}
    assert targets == {f"/etc/kafka/secrets/{env['KAFKA_SSL_KEYSTORE_FILENAME']}": "kafka_keystore",
                       f"/etc/kafka/secrets/{env['KAFKA_SSL_KEYSTORE_CREDENTIALS']}": "kafka_keystore_password"}
    assert env["KAFKA_SSL_KEY_CREDENTIALS"] == env["KAFKA_SSL_KEYSTORE_CREDENTIALS"]
    jaas = env["KAFKA_OPTS"].split("=", 1)[1]
    assert f"./deploy/kafka/kafka_server_jaas.conf:{jaas}:ro" in services["kafka"]["volumes"]
    assert "ScramLoginModule required;" in (ROOT / "deploy/kafka/kafka_server_jaas.conf").read_text()


def test_no_secret_is_an_environment_value(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in env_of(service).items():
            if key.startswith("KAFKA_SSL_") and key.endswith(("_FILENAME", "_CREDENTIALS")):
                targets = {t["target"] for t in service["secrets"]}
                assert f"/etc/kafka/secrets/{value}" in targets, f"{name}: {key} names no mounted secret"
                continue
            if SECRET_KEY.search(key) and key != "GF_SECURITY_ADMIN_USER":
                assert key.endswith(("_FILE", "__FILE")), f"{name}: {key} is a value, not a file"
                assert value.startswith("/run/secrets/"), f"{name}: {key}={value}"
                secret = value.removeprefix("/run/secrets/")
                assert secret in (service.get("secrets") or []), f"{name}: {secret} is not mounted"
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    refs = {var for var, _ in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}", text)}
    assert refs == {"KAFKA_CLUSTER_ID", "KAFKA_FLEET_HOST", "KAFKA_FLEET_BIND"}, "variables name no secret"


def test_every_secret_file_is_written_by_make_secrets_or_named_for_the_operator(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    files = {n: s["file"] for n, s in compose["secrets"].items()}
    assert all(f.startswith("./secrets/") for f in files.values())
    done = subprocess.run(["bash", str(ROOT / "deploy/make-secrets.sh"), "--kafka-host", "kafka.fleet.internal",
                           "--kafka-bind", "10.1.2.3", "--dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    operator = {n for n, f in files.items() if not (tmp_path / f).is_file()}
    assert operator == {"alertmanager_pagerduty_routing_key", "alertmanager_slack_webhook_url",
                        "alertmanager_webhook_url"}
    assert all(f"still to write: {tmp_path}/secrets/{n}" in done.stdout for n in operator)
    for name in set(files) - operator:
        assert (tmp_path / files[name]).stat().st_mode & 0o077 == 0, name
    # Every file it wrote is 0600 but the CA certificate, which is public (GPU nodes trust it), as its help says.
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "secrets").iterdir()}
    assert {n: m for n, m in modes.items() if m != 0o600} == {"kafka-ca.pem": 0o644}
    assert modes["kafka-ca.key"] == 0o600
    usage = subprocess.run(["bash", str(ROOT / "deploy/make-secrets.sh"), "--help"], capture_output=True, text=True,
                           timeout=30, check=True).stdout
    assert all(ln.startswith("#") for ln in usage.splitlines()), "the help is the header comment, no code"
    assert ("Every file under ./secrets/ is mode 0600 but the CA certificate kafka-ca.pem, which is public (GPU "
            "nodes trust it): 0644.") in " ".join(usage.replace("#", " ").split())
    env = dict(ln.split("=", 1) for ln in (tmp_path / ".env").read_text().splitlines())
    assert set(env) == {"KAFKA_CLUSTER_ID", "KAFKA_FLEET_HOST", "KAFKA_FLEET_BIND"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["KAFKA_CLUSTER_ID"])
    # The keystore opens with its password file and names the fleet host; the CA signed it.
    store = tmp_path / "secrets/kafka.keystore.p12"
    password = (tmp_path / "secrets/kafka_keystore_password").read_text().strip()
    cert = subprocess.run(["openssl", "pkcs12", "-in", str(store), "-nokeys", "-clcerts", "-passin",
                           f"pass:{password}"], capture_output=True, text=True, timeout=60, check=True).stdout
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=cert, capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "DNS:kafka.fleet.internal" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "secrets/kafka-ca.pem")], input=cert,
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Run again: nothing is replaced.
    before = (tmp_path / "secrets/clickhouse_admin_password").read_text()
    subprocess.run(["bash", str(ROOT / "deploy/make-secrets.sh"), "--kafka-host", "x", "--kafka-bind", "1.2.3.4",
                    "--dir", str(tmp_path)], capture_output=True, timeout=120, check=True)
    assert (tmp_path / "secrets/clickhouse_admin_password").read_text() == before
    assert (tmp_path / ".env").read_text().count("KAFKA_CLUSTER_ID=") == 1


def test_each_service_has_its_own_clickhouse_user(services: dict[str, dict[str, Any]]) -> None:
    users = {n: (env_of(services[n]).get("CLICKHOUSE_USER"), env_of(services[n]).get("CLICKHOUSE_PASSWORD_FILE"))
             for n in ("migrate", "ingester", "alerts")}
    assert users == {
        "migrate": ("gpufleet_admin", "/run/secrets/clickhouse_admin_password"),
        "ingester": ("gpufleet_ingest", "/run/secrets/clickhouse_ingest_password"),
        "alerts": ("gpufleet_alerts", "/run/secrets/clickhouse_alerts_password"),
    }
    assert env_of(services["grafana"])["CLICKHOUSE_USER"] == "gpufleet_grafana"
    for name in ("agent-sim-1", "agent-sim-2"):
        assert not any(SECRET_KEY.search(k) or "CLICKHOUSE" in k for k in env_of(services[name])), name
        assert not services[name].get("secrets"), name


def test_simulated_agents_are_in_the_demo_profile_only(services: dict[str, dict[str, Any]]) -> None:
    profiled = {n for n, s in services.items() if s.get("profiles")}
    assert profiled == {"agent-sim-1", "agent-sim-2"}
    assert all(services[n]["profiles"] == ["demo"] for n in profiled)


def test_every_long_running_service_has_a_memory_limit(services: dict[str, dict[str, Any]]) -> None:
    limits = {n: s.get("mem_limit") for n, s in services.items() if n not in ONE_SHOTS}
    assert all(limits.values()), limits
    assert limits["clickhouse"] == "8g"
    assert "-Xmx1g" in env_of(services["kafka"])["KAFKA_HEAP_OPTS"]


# --- the three-broker override (deploy/compose/kafka-cluster.yml) ----------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!override`, `!reset`), read as their plain values."""


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.load(KAFKA_CLUSTER.read_text(), Loader=_ComposeLoader)  # a SafeLoader


def test_kafka_cluster_override_makes_three_voters_with_replication_three(
    services: dict[str, dict[str, Any]], cluster: dict[str, Any]
) -> None:
    over = cluster["services"]
    assert set(over) == {"kafka", "kafka-2", "kafka-3", "kafka-init"}
    brokers = {"kafka": {**env_of(services["kafka"]), **env_of(over["kafka"])}}
    for name in ("kafka-2", "kafka-3"):
        extends = over[name]["extends"]
        assert (KAFKA_CLUSTER.parent / extends["file"]).resolve() == COMPOSE
        assert extends["service"] == "kafka"
        assert over[name]["hostname"] == name
        brokers[name] = {**env_of(services["kafka"]), **env_of(over[name])}
    voters = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in brokers.items()}
    assert len(voters) == 3
    for name, env in brokers.items():
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters, name
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2"), name
        for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                    "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR"):
            assert env[key] == "3", (name, key)
        for key in ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR"):
            assert env[key] == "2", (name, key)
    assert over["kafka-init"]["depends_on"] == {"kafka-2": {"condition": "service_healthy"},
                                                "kafka-3": {"condition": "service_healthy"}}


def test_kafka_cluster_brokers_publish_and_advertise_their_own_ports_and_disks(
    services: dict[str, dict[str, Any]], cluster: dict[str, Any]
) -> None:
    over = cluster["services"]
    fleet_bind = re.compile(r"^\$\{KAFKA_FLEET_BIND:\?[^}]*\}$")
    host_ports = {"9092", "9094"}  # the first broker's, from docker-compose.yml
    base_jaas = next(v for v in services["kafka"]["volumes"] if "kafka_server_jaas.conf" in v)
    for name in ("kafka-2", "kafka-3"):
        service = over[name]
        advertised = dict(item.split("://", 1) for item in env_of(service)["KAFKA_ADVERTISED_LISTENERS"].split(","))
        assert advertised["INTERNAL"] == f"{name}:9092"
        (loop_ip, loop_port, loop_target), (bind, fleet_port, fleet_target) = host_port_bindings(service)
        assert (loop_ip, loop_target) == ("127.0.0.1", "29092"), "the HOST listener on loopback only"
        assert advertised["HOST"] == f"127.0.0.1:{loop_port}"
        assert fleet_bind.match(bind), "the FLEET listener on the private address"
        assert fleet_target == "9094"
        assert re.fullmatch(r"\$\{KAFKA_FLEET_HOST:\?[^}]*\}:" + fleet_port, advertised["FLEET"])
        assert not {loop_port, fleet_port} & host_ports, f"{name} reuses a host port"
        host_ports |= {loop_port, fleet_port}
        data = [v for v in service["volumes"] if v.endswith(":/var/lib/kafka/data")]
        assert data == [f"{name}-data:/var/lib/kafka/data"], "each broker has its own disk"
        assert f"{name}-data" in cluster["volumes"]
        assert base_jaas in service["volumes"]
        assert f"--bootstrap-server {name}:9092" in healthcheck_text(service)
    assert host_ports == {"9092", "9094", "9095", "9096", "9097", "9098"}
    text = "\n".join(ln for ln in KAFKA_CLUSTER.read_text().splitlines() if not ln.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) == {"KAFKA_FLEET_HOST", "KAFKA_FLEET_BIND"}


# --- ClickHouse users, settings and password entrypoint -------------------------------------------------


@pytest.fixture(scope="module")
def clickhouse_users() -> ET.Element:
    return ET.parse(CLICKHOUSE_USERS).getroot()


def _entrypoint_variables() -> list[str]:
    (line,) = [ln for ln in CLICKHOUSE_ENTRYPOINT.read_text().splitlines() if ln.startswith("for var in ")]
    return line.removeprefix("for var in ").removesuffix("; do").split()


def test_clickhouse_users_are_the_services_own_with_passwords_from_secret_files(
    services: dict[str, dict[str, Any]], clickhouse_users: ET.Element
) -> None:
    users = {u.tag: u for u in clickhouse_users.find("users")}  # type: ignore[union-attr]
    assert users.pop("default").get("remove") == "remove", "the passwordless default user is removed"
    assert set(users) == {"gpufleet_admin", "gpufleet_ingest", "gpufleet_alerts", "gpufleet_grafana"}
    used = {env_of(services[n])["CLICKHOUSE_USER"] for n in ("migrate", "ingester", "alerts", "grafana")}
    assert used == set(users)
    from_env = {name: u.find("password").get("from_env") for name, u in users.items()}  # type: ignore[union-attr]
    assert sorted(from_env.values()) == sorted(_entrypoint_variables())
    clickhouse = services["clickhouse"]
    env = env_of(clickhouse)
    for name, var in from_env.items():
        secret = env[f"{var}_FILE"].removeprefix("/run/secrets/")
        assert secret in clickhouse["secrets"], name
        # The service logging in as this user reads the same secret.
        for service in ("migrate", "ingester", "alerts"):
            if env_of(services[service])["CLICKHOUSE_USER"] == name:
                assert env_of(services[service])["CLICKHOUSE_PASSWORD_FILE"] == f"/run/secrets/{secret}"
        if name == "gpufleet_grafana":
            assert env_of(services["grafana"])["GF_CLICKHOUSE_PASSWORD__FILE"] == f"/run/secrets/{secret}"
    assert f"./{CLICKHOUSE_USERS.relative_to(ROOT)}:/etc/clickhouse-server/users.d/gpufleet.xml:ro" in \
        clickhouse["volumes"]


def test_clickhouse_users_have_least_privilege(clickhouse_users: ET.Element) -> None:
    users = {u.tag: u for u in clickhouse_users.find("users") if u.tag != "default"}  # type: ignore[union-attr]
    grants = {name: [q.text for q in u.iter("query")] for name, u in users.items()}
    assert users["gpufleet_admin"].findtext("access_management") == "1"
    assert grants["gpufleet_admin"] == [], "no <grants>: every privilege, for migrations and tenants"
    for name in ("gpufleet_ingest", "gpufleet_alerts", "gpufleet_grafana"):
        assert users[name].findtext("access_management") is None, name
    assert grants["gpufleet_alerts"] == ["GRANT SELECT ON gpufleet.*", "GRANT INSERT ON gpufleet.alerts"]
    assert grants["gpufleet_grafana"] == ["GRANT SELECT ON gpufleet.*"]
    assert "GRANT SELECT, INSERT ON gpufleet.*" in grants["gpufleet_ingest"]
    assert not any(re.search(r"\b(ALTER|DROP|TRUNCATE|ALL)\b", q) for q in grants["gpufleet_ingest"])
    profiles = {p.tag: p for p in clickhouse_users.find("profiles")}  # type: ignore[union-attr]
    assert {u.findtext("profile") for u in users.values()} <= set(profiles)
    grafana = profiles[users["gpufleet_grafana"].findtext("profile")]  # type: ignore[index]
    assert grafana.findtext("readonly") == "2"
    assert (grafana.findtext("max_memory_usage"), grafana.findtext("max_execution_time")) == ("2147483648", "60")
    assert profiles["gpufleet"].findtext("max_memory_usage") == "4294967296"


def test_clickhouse_server_memory_is_bounded_within_the_container(services: dict[str, dict[str, Any]]) -> None:
    config = ET.parse(CLICKHOUSE_CONFIG).getroot()
    assert float(config.findtext("max_server_memory_usage_to_ram_ratio")) == 0.75  # type: ignore[arg-type]
    assert services["clickhouse"]["mem_limit"] == "8g"
    caches = int(config.findtext("mark_cache_size")) + int(config.findtext("uncompressed_cache_size"))  # type: ignore[arg-type]
    assert caches < 8 * 1024**3 * 0.75 / 4, "the caches leave most of the server's bound to queries"
    assert f"./{CLICKHOUSE_CONFIG.relative_to(ROOT)}:/etc/clickhouse-server/config.d/gpufleet.xml:ro" in \
        services["clickhouse"]["volumes"]


def test_clickhouse_entrypoint_reads_the_password_files_then_runs_the_image_entrypoint(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    clickhouse = services["clickhouse"]
    assert clickhouse["entrypoint"] == ["/bin/bash", "/opt/gpufleet/entrypoint.sh", "/entrypoint.sh"]
    assert "./deploy/clickhouse/entrypoint.sh:/opt/gpufleet/entrypoint.sh:ro" in clickhouse["volumes"]
    env = {"PATH": "/usr/bin:/bin"}
    for var in _entrypoint_variables():
        (tmp_path / var).write_text(f"pw-{var}\n")
        env[f"{var}_FILE"] = str(tmp_path / var)
    done = subprocess.run(["bash", str(CLICKHOUSE_ENTRYPOINT), "env"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    seen = dict(ln.split("=", 1) for ln in done.stdout.splitlines() if "=" in ln)
    for var in _entrypoint_variables():
        assert seen[var] == f"pw-{var}", "the value, without the newline"
        assert f"{var}_FILE" not in seen, "the file variables are not passed on"
    (tmp_path / "CLICKHOUSE_ALERTS_PASSWORD").write_text("")
    empty = subprocess.run(["bash", str(CLICKHOUSE_ENTRYPOINT), "env"], env=env, capture_output=True, text=True,
                           timeout=30, check=False)
    assert empty.returncode == 1
    assert "(CLICKHOUSE_ALERTS_PASSWORD_FILE) is missing or empty" in empty.stderr


# --- the gpufleet config and the addresses in it ------------------------------------------------------


def test_gpufleet_services_mount_their_config_and_point_at_it(services: dict[str, dict[str, Any]]) -> None:
    for name, service in gpufleet_services(services).items():
        source = AGENT_SIMS.get(name, "deploy/compose/gpufleet.yaml")
        assert (ROOT / source).is_file()
        assert env_of(service)["GPUFLEET_CONFIG"] == CONFIG_IN_CONTAINER, name
        assert f"./{source}:{CONFIG_IN_CONTAINER}:ro" in service["volumes"], name


def test_simulated_agents_have_distinct_clusters_and_the_stack_kafka(config: Config) -> None:
    sims = {name: load(ROOT / path) for name, path in AGENT_SIMS.items()}
    # Simulated node names are "<cluster>-node-NNN": a shared cluster would double-count nodes.
    assert len({c.agent.cluster for c in sims.values()}) == len(sims)
    for name, sim in sims.items():
        assert sim.agent.backend == "simulated", name
        assert sim.kafka == config.kafka, f"{name}: Kafka settings differ from deploy/compose/gpufleet.yaml"
        assert sim.agent.spool_dir == "/var/lib/gpufleet/spool", name


def test_kafka_bootstrap_servers_are_a_compose_service(services: dict[str, dict[str, Any]], config: Config) -> None:
    servers = config.kafka.bootstrap_servers.split(",")
    for path in AGENT_SIMS.values():
        servers += load(ROOT / path).kafka.bootstrap_servers.split(",")
    for server in servers:
        host, _, port = server.strip().rpartition(":")
        assert host in services, f"bootstrap server {server}: no service {host!r}"
        assert int(port) in container_ports(services[host]), f"{host} does not expose {port}"
        assert f"INTERNAL://{server}" in env_of(services[host])["KAFKA_ADVERTISED_LISTENERS"]
    assert config.kafka.bootstrap_servers == "kafka:9092"


def test_clickhouse_dsn_is_the_compose_service_and_carries_no_credentials(
    services: dict[str, dict[str, Any]], config: Config
) -> None:
    dsn = urlsplit(config.clickhouse.dsn)
    assert (dsn.scheme, dsn.hostname, dsn.port) == ("http", "clickhouse", 8123)
    assert 8123 in container_ports(services["clickhouse"])
    assert dsn.username is None, "each service names its own user (CLICKHOUSE_USER)"
    assert dsn.password is None


def test_alertmanager_url_is_the_compose_service(services: dict[str, dict[str, Any]], config: Config) -> None:
    url = urlsplit(config.alerts.alertmanager_url or "")
    assert (url.scheme, url.hostname, url.port) == ("http", "alertmanager", 9093)
    assert 9093 in container_ports(services["alertmanager"])
    assert "--web.listen-address=:9093" in services["alertmanager"]["command"]


def test_kafka_init_creates_topics_user_and_acls_as_the_config_says(
    services: dict[str, dict[str, Any]], config: Config, tmp_path: Path
) -> None:
    """deploy/kafka/init.sh run here against recording stand-ins of the Kafka tools: the exact calls."""
    init = services["kafka-init"]
    env = env_of(init)
    assert (env["PARTITIONS"], env["RETENTION_MS"], env["RETENTION_BYTES"]) == (
        str(config.kafka.partitions), str(config.kafka.retention_ms), str(config.kafka.retention_bytes))
    assert (config.kafka.topic, config.kafka.dlq_topic) == ("gpufleet.samples", "gpufleet.dlq")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kafka-topics.sh", "kafka-configs.sh", "kafka-acls.sh"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "pw").write_text("0123abcd\n")
    run_env = {**env, "KAFKA_BIN": str(bin_dir), "AGENT_PASSWORD_FILE": str(tmp_path / "pw"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(ROOT / "deploy/kafka/init.sh")], env=run_env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "kafka-topics.sh --bootstrap-server kafka:9092 --create --if-not-exists --topic gpufleet.samples "
        "--partitions 8 --config retention.ms=604800000 --config retention.bytes=22548578304",
        "kafka-topics.sh --bootstrap-server kafka:9092 --create --if-not-exists --topic gpufleet.dlq "
        "--partitions 1 --config retention.ms=2592000000 --config retention.bytes=1073741824",
        "kafka-configs.sh --bootstrap-server kafka:9092 --alter --entity-type users --entity-name gpufleet-agent "
        "--add-config SCRAM-SHA-512=[password=0123abcd]",
        "kafka-acls.sh --bootstrap-server kafka:9092 --add --allow-principal User:gpufleet-agent "
        "--operation Write --operation Describe --topic gpufleet.samples",
        "kafka-topics.sh --bootstrap-server kafka:9092 --describe --topic gpufleet.samples,gpufleet.dlq",
    ]
    assert "--replication-factor" not in (tmp_path / "calls").read_text(), "the cluster's default replication"
    (tmp_path / "pw").write_text("a,b]\n")
    bad = subprocess.run(["bash", str(ROOT / "deploy/kafka/init.sh")], env=run_env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 1
    assert "may hold only letters, digits" in bad.stderr


# --- Grafana and Alertmanager -----------------------------------------------------------------------


def test_grafana_has_the_plugin_baked_in_and_secrets_from_files(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    env = env_of(grafana)
    assert "GF_INSTALL_PLUGINS" not in env
    assert env["GF_PLUGINS_PREINSTALL_DISABLED"] == "true"
    assert grafana["build"]["context"] == "deploy/grafana"
    dockerfile = (ROOT / "deploy/grafana/Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert base == f"grafana/grafana:{image_tag(grafana['image'])}"
    assert re.search(r"plugins install grafana-clickhouse-datasource \d+\.\d+\.\d+ ", dockerfile)
    for key, secret in (("GF_SECURITY_ADMIN_PASSWORD__FILE", "grafana_admin_password"),
                        ("GF_SECURITY_SECRET_KEY__FILE", "grafana_secret_key"),
                        ("GF_CLICKHOUSE_PASSWORD__FILE", "clickhouse_grafana_password")):
        assert env[key] == f"/run/secrets/{secret}"
    datasource = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/clickhouse.yaml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["secureJsonData"]["password"] == "${GF_CLICKHOUSE_PASSWORD}"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert (env["CLICKHOUSE_HOST"], env["CLICKHOUSE_PORT"]) == ("clickhouse", "8123")


def test_grafana_provisions_no_alert_rules_one_alert_path(services: dict[str, dict[str, Any]]) -> None:
    volumes = services["grafana"]["volumes"]
    assert "./dashboards/provisioning/datasources:/etc/grafana/provisioning/datasources:ro" in volumes
    assert "./dashboards/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro" in volumes
    assert "./dashboards/boards:/var/lib/grafana/dashboards:ro" in volumes
    assert not any("alerting" in v or v.startswith("./dashboards/provisioning:") for v in volumes)


def test_bind_mounted_repo_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    missing_dashboards = []
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if not source.startswith("./"):
                continue  # a named volume
            if source.startswith("./dashboards/"):
                if not (ROOT / source).exists():
                    missing_dashboards.append(source)
                continue
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
    if missing_dashboards:
        pytest.skip(
            f"Grafana mounts {', '.join(sorted(missing_dashboards))}, not written yet (the dashboards "
            "issue owns them); every other bind mount exists"
        )


def test_alertmanager_config_routes_to_a_defined_receiver() -> None:
    am = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"] for r in am["receivers"]}
    routes = [am["route"], *am["route"].get("routes", [])]
    assert all(r["receiver"] in receivers for r in routes)
    text = ALERTMANAGER_CONFIG.read_text()
    # Secret-bearing settings appear only as *_file references to mounted secrets.
    for key in ("routing_key", "api_url", "url"):
        assert not re.search(rf"^\s*#?\s*-?\s*{key}:", text, re.MULTILINE), key


def _amtool_config(tmp_path: Path) -> Path:
    """The shipped config for the Debian amtool (0.25): templates from the repository; `url_file`, which
    Alertmanager has from 0.26 (the compose image is 0.28), as `url`."""
    text = ALERTMANAGER_CONFIG.read_text().replace("/etc/alertmanager/templates/",
                                                    f"{ROOT}/deploy/alertmanager/templates/")
    text = text.replace("url_file: /run/secrets/alertmanager_webhook_url", "url: http://127.0.0.1:9/hook")
    out = tmp_path / "alertmanager.yml"
    out.write_text(text)
    return out


def test_alertmanager_config_passes_amtool_and_routes_as_documented(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager)")
    config = _amtool_config(tmp_path)
    result = subprocess.run([amtool, "check-config", str(config)], check=False, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert " - 4 inhibit rules" in result.stdout
    assert " - 1 templates" in result.stdout

    def route(*labels: str) -> str:
        done = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels],
                              check=False, capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    assert route("severity=critical", "alertname=GpuFailing") == "pagerduty,webhook"
    assert route("severity=critical", "alertname=NodeSilent") == "pagerduty,webhook"
    assert route("severity=warning", "alertname=GpuIdleAllocated") == "slack"
    assert route("severity=info", "alertname=FleetMfuBelowTarget") == "slack"
    assert route("severity=critical", "alertname=GpuNeedsReset") == "pagerduty,webhook"
    assert route("severity=warning", "alertname=NetworkPortDegraded") == "slack"


def test_alertmanager_config_inhibits_gpu_alerts_of_a_silent_node() -> None:
    am = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert {"source_matchers": ['alertname="NodeSilent"'], "target_matchers": ['alertname=~"Gpu.*"'],
            "equal": ["cluster", "node"]} in am["inhibit_rules"]
    # the page with the remedy replaces the generic one
    assert {"source_matchers": ['alertname="GpuNeedsReset"'], "target_matchers": ['alertname="GpuFailing"'],
            "equal": ["cluster", "node", "gpu"]} in am["inhibit_rules"]
    assert {"source_matchers": ['alertname="NodeNeedsReboot"'],
            "target_matchers": ['alertname=~"GpuFailing|GpuNeedsReset"'], "equal": ["cluster", "node"]} in am[
        "inhibit_rules"]
    names = {r["name"]: r for r in am["receivers"]}
    pagerduty = names["pagerduty"]["pagerduty_configs"][0]
    assert pagerduty["routing_key_file"] == "/run/secrets/alertmanager_pagerduty_routing_key"
    assert names["slack"]["slack_configs"][0]["api_url_file"] == "/run/secrets/alertmanager_slack_webhook_url"
    assert names["webhook"]["webhook_configs"][0]["url_file"] == "/run/secrets/alertmanager_webhook_url"


def test_alerts_doc_routing_example_is_the_shipped_config() -> None:
    """docs/alerts.md shows the shipped routes and inhibitions as they are, and the receivers by their names and
    secret files (their texts left out)."""
    text = (ROOT / "docs" / "alerts.md").read_text()
    section = text[text.index("## Routing, silences and receivers"):text.index("## Runbooks")]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    doc = yaml.safe_load(block)
    am = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert doc["route"] == am["route"]
    assert doc["inhibit_rules"] == am["inhibit_rules"]
    shipped = {r["name"]: r for r in am["receivers"]}
    assert [r["name"] for r in doc["receivers"]] == list(shipped)
    for receiver in doc["receivers"]:
        for kind, configs in receiver.items():
            if kind == "name":
                continue
            want = shipped[receiver["name"]][kind]
            assert len(configs) == len(want), (receiver["name"], kind)
            for shown, real in zip(configs, want, strict=True):
                assert shown.items() <= real.items(), (receiver["name"], kind)
                assert {k for k in real if k.endswith("_file")} <= set(shown), "every secret file is shown"


def test_alertmanager_templates_define_every_template_the_receivers_use(services: dict[str, dict[str, Any]]) -> None:
    """The receivers' `{{ template "name" . }}` calls name templates of deploy/alertmanager/templates/ (also
    parsed by amtool, where installed)."""
    used = set(re.findall(r'template "([^"]+)"', ALERTMANAGER_CONFIG.read_text()))
    assert sorted(ALERTMANAGER_TEMPLATES.parent.glob("*.tmpl")) == [ALERTMANAGER_TEMPLATES]
    defined = set(re.findall(r'define "([^"]+)"', ALERTMANAGER_TEMPLATES.read_text()))
    assert used
    assert used <= defined, used - defined
    am = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert am["templates"] == ["/etc/alertmanager/templates/*.tmpl"]
    assert "./deploy/alertmanager/templates:/etc/alertmanager/templates:ro" in services["alertmanager"]["volumes"]


# --- schema and image build -----------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (ships the Compose Specification schema)")
    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(yaml.safe_load(COMPOSE.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def _extras_closure(optional: dict[str, list[str]], extras: list[str]) -> set[str]:
    """Requirement names pulled in by `extras`, following self-references like gpufleet[pipeline]."""
    names: set[str] = set()
    todo = list(extras)
    seen: set[str] = set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
            if name == "gpufleet":
                todo.extend(re.search(r"\[(.*)\]", req).group(1).split(","))  # type: ignore[union-attr]
            else:
                names.add(name)
    return names


def test_dockerfile_installs_the_server_extras_without_chdb_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert "pip install -c constraints.txt '.[pipeline,grafana,kubernetes]'" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["gpufleet"]' in dockerfile
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = _extras_closure(optional, ["pipeline", "grafana"])
    assert "clickhouse-connect" in installed
    assert "chdb" not in installed
    assert "chdb" in _extras_closure(optional, ["dev"])  # the closure does follow gpufleet[...] references


def _dockerignored(path: str, patterns: set[str]) -> bool:
    """Whether the build context leaves `path` out: a pattern matches it or a folder above it (Docker's rule for
    the plain patterns used here; no `!` exceptions, which the test below refuses)."""
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:n]), p) for n in range(1, len(parts) + 1) for p in patterns)


def test_dockerignore_keeps_what_pip_install_needs_and_leaves_secrets_out() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "gpufleet", "pipeline", "agents", "dashboards",
                   "embedded"):
        assert needed not in ignored, needed
    # `COPY . .` must never carry make-secrets.sh's output or local build outputs into the image's build.
    assert not any(p.startswith("!") for p in ignored)
    assert {"secrets", ".env", "dist", "build"} <= ignored
    for kept_out in ("secrets/kafka_agent_password", "secrets/kafka-ca.key", ".env", f"dist/gpufleet-agent-"
                     f"{__version__}-linux-x86_64", "dist/wheelhouse/requirements.txt", "build/lib/gpufleet/cli.py"):
        assert _dockerignored(kept_out, ignored), kept_out
    for kept in ("pyproject.toml", "gpufleet/cli.py", "pipeline/store/client.py", "README.md"):
        assert not _dockerignored(kept, ignored), kept


# --- docs/security.md describes this stack ---------------------------------------------------------------


def test_security_doc_names_the_secret_variables_and_users_of_this_stack(
    services: dict[str, dict[str, Any]], clickhouse_users: ET.Element
) -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    section = text[text.index("\n## docker compose\n"):]
    named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`", section))
    set_here = {key for service in services.values() for key in env_of(service)}
    env_file = {"KAFKA_CLUSTER_ID", "KAFKA_FLEET_HOST", "KAFKA_FLEET_BIND"}
    # Every variable it names is one the stack sets or .env holds (no retired CLICKHOUSE_PASSWORD) ...
    assert named - set_here - env_file == set()
    # ... and it names every secret file variable and every .env variable.
    assert {key for key in set_here if key.endswith("_FILE")} | env_file <= named
    users = {u.tag for u in clickhouse_users.find("users") if u.get("remove") is None}  # type: ignore[union-attr]
    assert len(users) == 4
    assert {user for user in users if f"`{user}`" in section} == users
    assert "`deploy/make-secrets.sh`" in section
