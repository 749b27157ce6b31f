"""The production stack definition: docker-compose.yml, its gpufleet config, Dockerfile, Alertmanager config.

No Docker here, so these read the files: every service the code needs is present, images are
pinned, every long-running service has a healthcheck, host ports sit on 127.0.0.1, secrets are
required variables (never literals), and every address in deploy/compose/gpufleet.yaml names a
service and port that exist in the compose file. Where the validators are installed, the compose
file is also checked against the Compose Specification and the Alertmanager config with amtool.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import tomllib
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
        parts = str(port).split(":")
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
    assert services["ingester"]["command"] == ["ingest"]
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
    alerts = healthcheck_text(services["alerts"])
    assert "('clickhouse', 8123)" in alerts
    assert "('alertmanager', 9093)" in alerts
    for name, path in AGENT_SIMS.items():
        host, _, port = load(ROOT / path).kafka.bootstrap_servers.partition(":")
        assert f"('{host}', {port})" in healthcheck_text(services[name]), name


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


def test_agent_healthcheck_passes_against_a_real_kafka_broker(services: dict[str, dict[str, Any]], broker: Any) -> None:
    swap = ("('kafka', 9092)", f"('{broker.host}', {broker.port})")
    assert _run_healthcheck(services["agent-sim-1"], swap) == 0


# --- exposure and secrets --------------------------------------------------------------------------


def test_host_ports_are_bound_to_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = {}
    for name, service in services.items():
        for host_ip, host_port, container in host_port_bindings(service):
            assert host_ip == "127.0.0.1", f"{name}: port {host_port}->{container} is not bound to 127.0.0.1"
            published[name] = (host_port, container)
    assert published == {
        "kafka": ("9092", "29092"),
        "clickhouse": ("8123", "8123"),
        "alertmanager": ("9093", "9093"),
        "grafana": ("3000", "3000"),
    }


def test_kafka_advertises_the_host_listener_on_the_published_loopback_port(
    services: dict[str, dict[str, Any]],
) -> None:
    env = env_of(services["kafka"])
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners["HOST"] == ":29092"
    assert advertised["HOST"] == "127.0.0.1:9092"
    assert listeners["INTERNAL"] == ":9092"
    assert advertised["INTERNAL"] == "kafka:9092"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_secrets_are_required_variables_never_literals(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in env_of(service).items():
            if SECRET_KEY.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{name}: {key} must be ${{VAR:?message}}, not {value!r}"


def test_secret_variables_never_have_defaults() -> None:
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    refs = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}", text)
    assert refs
    for var, rest in refs:
        if SECRET_KEY.search(var):
            assert rest.startswith(":?"), f"${{{var}{rest}}} must be required (':?'), with no default"
    assert {var for var, rest in refs if rest.startswith(":?")} == {"CLICKHOUSE_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}


def test_required_variables_are_documented() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for var in ("CLICKHOUSE_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert var in doc


def test_agents_get_no_clickhouse_credentials(services: dict[str, dict[str, Any]]) -> None:
    for name in ("agent-sim-1", "agent-sim-2"):
        assert not any(SECRET_KEY.search(k) for k in env_of(services[name])), name
    for name in ("migrate", "ingester", "alerts"):
        assert "CLICKHOUSE_PASSWORD" in env_of(services[name]), name


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
        assert server in env_of(services[host])["KAFKA_ADVERTISED_LISTENERS"]
    assert config.kafka.bootstrap_servers == "kafka:9092"


def test_clickhouse_dsn_is_the_compose_service_and_carries_no_password(
    services: dict[str, dict[str, Any]], config: Config
) -> None:
    dsn = urlsplit(config.clickhouse.dsn)
    assert dsn.scheme == "http"
    assert (dsn.hostname, dsn.port) == ("clickhouse", 8123)
    assert dsn.hostname in services
    assert 8123 in container_ports(services["clickhouse"])
    assert dsn.password is None, "the password comes from CLICKHOUSE_PASSWORD, never the config file"
    assert dsn.username == env_of(services["clickhouse"])["CLICKHOUSE_USER"]
    for name in ("migrate", "ingester", "alerts", "grafana"):
        assert env_of(services[name])["CLICKHOUSE_USER"] == dsn.username, name


def test_alertmanager_url_is_the_compose_service(services: dict[str, dict[str, Any]], config: Config) -> None:
    url = urlsplit(config.alerts.alertmanager_url or "")
    assert (url.scheme, url.hostname, url.port) == ("http", "alertmanager", 9093)
    assert 9093 in container_ports(services["alertmanager"])
    assert "--web.listen-address=:9093" in services["alertmanager"]["command"]


def test_topics_created_by_kafka_init_match_the_config(services: dict[str, dict[str, Any]], config: Config) -> None:
    script = services["kafka-init"]["command"][0]
    assert f"--topic {config.kafka.topic} --partitions {config.kafka.partitions} " in script
    assert config.kafka.partitions == 8
    assert f"--topic {config.kafka.dlq_topic} " in script
    assert script.count("--if-not-exists") == 2
    assert "$" not in script, "a '$' would be interpolated by compose"


# --- Grafana and Alertmanager -----------------------------------------------------------------------


def test_grafana_plugin_is_pinned_and_admin_password_required(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["grafana"])
    plugin, version = env["GF_INSTALL_PLUGINS"].split(" ")
    assert plugin == "grafana-clickhouse-datasource"
    assert EXACT_VERSION.match(version)
    assert REQUIRED_REF.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert (env["CLICKHOUSE_HOST"], env["CLICKHOUSE_PORT"]) == ("clickhouse", "8123")


def test_grafana_mounts_the_provisioning_and_dashboards_read_only(services: dict[str, dict[str, Any]]) -> None:
    volumes = services["grafana"]["volumes"]
    assert "./dashboards/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./dashboards/boards:/var/lib/grafana/dashboards:ro" in volumes


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


def test_alertmanager_config_passes_amtool(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager)")
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], check=False, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


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
    assert "pip install -c constraints.txt '.[pipeline,grafana]'" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["gpufleet"]' in dockerfile
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = _extras_closure(optional, ["pipeline", "grafana"])
    assert "clickhouse-connect" in installed
    assert "chdb" not in installed
    assert "chdb" in _extras_closure(optional, ["dev"])  # the closure does follow gpufleet[...] references


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "gpufleet", "pipeline", "agents", "dashboards",
                   "embedded"):
        assert needed not in ignored, needed
