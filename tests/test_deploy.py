"""Node install artefacts: the systemd unit, install.sh with its agent config, and the Kubernetes DaemonSet.

The unit is read with configparser and checked for restart, identity, device access and
sandboxing, and verified by `systemd-analyze` where present. install.sh passes `bash -n`, and
the config-writing step it runs is executed here on the shipped template. The DaemonSet is
parsed (multi-document) and its agent config validated with gpufleet's own loader; where
kubernetes-validate is installed, every object is checked against the Kubernetes schema.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.config import Config, load, parse
from gpufleet.version import __version__

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "gpufleet-agent.service"
INSTALL = SYSTEMD / "install.sh"
SLURM_DROPIN = SYSTEMD / "gpufleet-agent-slurm.conf"
AGENT_YAML = SYSTEMD / "agent.yaml"
DAEMONSET = ROOT / "deploy" / "k8s" / "agent-daemonset.yaml"
DOC = ROOT / "docs" / "deploy.md"


# --- systemd unit ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a checker; the test reads its exit code and output."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, **kwargs)


def unit_values(key: str) -> list[str]:
    """Every value of a key that systemd allows to repeat (configparser keeps only the last)."""
    return [ln.split("=", 1)[1] for ln in UNIT.read_text().splitlines() if ln.startswith(f"{key}=")]


def test_unit_restarts_always_and_never_gives_up(unit: configparser.ConfigParser) -> None:
    assert unit["Service"]["Restart"] == "always"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_runs_the_installed_agent_with_its_config_and_credential(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/gpufleet/bin/gpufleet agent"
    assert 'BIN="$PREFIX/bin/gpufleet"' in INSTALL.read_text()
    assert "GPUFLEET_CONFIG=/etc/gpufleet/agent.yaml" in unit_values("Environment")
    assert unit_values("EnvironmentFile") == [], "secrets come as files, not environment"
    assert unit_values("LoadCredential") == ["kafka-password:/etc/gpufleet/kafka-password"]
    cfg = load(AGENT_YAML)
    assert cfg.kafka.sasl_password_file == "/run/credentials/gpufleet-agent.service/kafka-password"
    assert cfg.kafka.ssl_cafile == "/etc/gpufleet/kafka-ca.pem"
    assert (cfg.kafka.security_protocol, cfg.kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")


def test_unit_identity_and_spool_state_directory(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "gpufleet"
    # The spool of the shipped agent config lives inside the state directory.
    assert load(AGENT_YAML).agent.spool_dir.startswith("/var/lib/gpufleet/")


def test_unit_grants_nvidia_devices_and_closes_the_rest(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["DevicePolicy"] == "closed"
    assert service["PrivateDevices"] == "no", "PrivateDevices=yes would hide /dev/nvidia*"
    # Major 195 under the proprietary module ("nvidia-frontend") and the open one ("nvidia", "nvidiactl").
    assert unit_values("DeviceAllow") == [
        "char-nvidia-frontend rw",
        "char-nvidia rw",
        "char-nvidiactl rw",
        "char-nvidia-caps r",
    ]


def test_unit_is_sandboxed(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
    }
    assert {k: service[k] for k in expected} == expected
    assert service["MemoryMax"] == "512M"


def _unit_copy_with_runnable_exec(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at /bin/true: verify checks the binary exists, and here it does not."""
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text(), flags=re.MULTILINE))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    result = run([tool, "verify", str(_unit_copy_with_runnable_exec(tmp_path))])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"Unknown (key|section)|Failed to parse|Invalid", output), output


def test_unit_exposure_score_is_low(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    result = run([tool, "security", "--offline=yes", str(_unit_copy_with_runnable_exec(tmp_path))])
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout


# --- install.sh and the agent config it writes -------------------------------------------------------------


def test_install_script_parses_and_is_executable() -> None:
    result = run(["bash", "-n", str(INSTALL)])
    assert result.returncode == 0, result.stderr
    assert os.access(INSTALL, os.X_OK)
    assert INSTALL.read_text().startswith("#!/usr/bin/env bash\n")


def test_install_script_help_and_bad_option() -> None:
    ok = run(["bash", str(INSTALL), "--help"])
    assert ok.returncode == 0
    assert "Usage: sudo" in ok.stdout
    assert "--kafka HOST:PORT" in ok.stdout
    bad = run(["bash", str(INSTALL), "--frobnicate"])
    assert bad.returncode == 1
    assert "unknown option '--frobnicate'" in bad.stderr


def test_install_script_passes_shellcheck() -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = run([tool, str(INSTALL)])
    assert result.returncode == 0, result.stdout


def test_install_script_never_installs_from_an_index_by_name() -> None:
    text = INSTALL.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "gpufleet==" not in code
    (pip,) = re.findall(r'/bin/pip" install(.*?)-r "\$reqs"', code, re.DOTALL)
    assert "--no-index" in pip
    assert "--require-hashes" in pip
    assert "gpufleet[" not in text, "the node install takes no extras"


def test_shipped_agent_config_is_valid_and_local_only() -> None:
    cfg: Config = load(AGENT_YAML)
    assert cfg.agent.backend == "nvml"
    assert cfg.agent.otlp_receiver_host == "127.0.0.1"
    assert cfg.agent.otlp_receiver_port == 4318
    assert not re.search(r"^\s*[a-z_]*password\s*:", AGENT_YAML.read_text(), re.MULTILINE)


# --- Kubernetes DaemonSet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return manifests["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def agent_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == "agent"]
    return container


@pytest.fixture(scope="module")
def k8s_agent_config(manifests: dict[str, dict[str, Any]]) -> Config:
    return parse(yaml.safe_load(manifests["ConfigMap"]["data"]["agent.yaml"]), source="ConfigMap agent.yaml")


def test_manifest_has_every_object_in_one_namespace(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "ClusterRole",
                              "ClusterRoleBinding"}
    namespace = manifests["Namespace"]["metadata"]["name"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert manifests[kind]["metadata"]["namespace"] == namespace, kind


def test_daemonset_selects_its_own_pods_and_service_account(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any]
) -> None:
    ds = manifests["DaemonSet"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]
    # the token reads pod labels for allocation.tenant_label/job_label, and the role allows that only
    assert pod["automountServiceAccountToken"] is True
    role, binding = manifests["ClusterRole"], manifests["ClusterRoleBinding"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": manifests["Namespace"]["metadata"]["name"]}]


def test_daemonset_runs_on_gpu_nodes_only(pod: dict[str, Any]) -> None:
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_daemonset_has_nvml_access_without_taking_a_gpu(pod: dict[str, Any], agent_container: dict[str, Any]) -> None:
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in agent_container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    for section in agent_container["resources"].values():
        assert "nvidia.com/gpu" not in section, "requesting a GPU would take it from the jobs"
    assert agent_container["securityContext"]["privileged"] is False


def test_daemonset_has_resource_requests_and_limits(agent_container: dict[str, Any]) -> None:
    resources = agent_container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_daemonset_image_is_pinned_to_the_package_version(pod: dict[str, Any]) -> None:
    images = {c["image"] for c in pod["containers"] + pod["initContainers"]}
    assert len(images) == 1
    (image,) = images
    assert image.rsplit(":", 1)[1] == __version__


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container["volumeMounts"]}


def test_spool_and_kubelet_socket_are_host_paths_matching_the_config(
    pod: dict[str, Any], agent_container: dict[str, Any], k8s_agent_config: Config
) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _mounts(agent_container)
    assert volumes["spool"]["hostPath"]["path"] == "/var/lib/gpufleet/spool"
    assert mounts["spool"]["mountPath"] == k8s_agent_config.agent.spool_dir
    assert not mounts["spool"].get("readOnly", False)
    sockets = "/var/lib/kubelet/pod-resources"
    assert volumes["pod-resources"]["hostPath"] == {"path": sockets, "type": "Directory"}
    assert mounts["pod-resources"]["mountPath"] == sockets
    assert mounts["pod-resources"]["readOnly"] is True
    assert k8s_agent_config.agent.allocation.source == "kubernetes"
    assert k8s_agent_config.agent.allocation.kubelet_socket == f"{sockets}/kubelet.sock"
    # The spool is handed to the agent's uid by the init container.
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "chown",
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
        k8s_agent_config.agent.spool_dir,
    ]


def test_config_map_is_mounted_where_gpufleet_config_points(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any], agent_container: dict[str, Any]
) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in agent_container["env"]}
    mount = _mounts(agent_container)["config"]
    assert env["GPUFLEET_CONFIG"] == f"{mount['mountPath']}/agent.yaml"
    assert mount["readOnly"] is True


def test_otlp_receiver_is_on_the_node_loopback(
    pod: dict[str, Any], agent_container: dict[str, Any], k8s_agent_config: Config
) -> None:
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert k8s_agent_config.agent.otlp_receiver_host == "127.0.0.1"
    assert k8s_agent_config.agent.otlp_receiver_enabled is True, "jobs on the node push OTLP to the receiver"
    port = k8s_agent_config.agent.otlp_receiver_port
    assert [p["containerPort"] for p in agent_container["ports"]] == [port] == [4318]



def test_kafka_ca_and_password_are_files_from_a_configmap_and_a_secret(
    pod: dict[str, Any], agent_container: dict[str, Any], k8s_agent_config: Config
) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["kafka"]["projected"]["sources"]
    assert sources == [{"configMap": {"name": "gpufleet-kafka-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                       {"secret": {"name": "gpufleet-agent",
                                   "items": [{"key": "kafka-password", "path": "kafka-password"}]}}]
    mount = _mounts(agent_container)["kafka"]["mountPath"]
    assert k8s_agent_config.kafka.ssl_cafile == f"{mount}/ca.crt"
    assert k8s_agent_config.kafka.sasl_password_file == f"{mount}/kafka-password"
    assert (k8s_agent_config.kafka.security_protocol, k8s_agent_config.kafka.sasl_mechanism) == (
        "SASL_SSL", "SCRAM-SHA-512")
    assert volumes["kafka"]["projected"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in agent_container["env"])


def test_daemonset_probes_use_the_agent_health_endpoint(agent_container: dict[str, Any],
                                                        k8s_agent_config: Config) -> None:
    port = k8s_agent_config.agent.health_port
    assert (port, k8s_agent_config.agent.health_host) == (9410, "127.0.0.1")
    assert agent_container["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "port": port, "path": "/readyz"}
    assert agent_container["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "port": port, "path": "/healthz"}


def test_daemonset_is_node_critical_named_by_spec_node_name_and_monitors_mig(
    pod: dict[str, Any], agent_container: dict[str, Any]
) -> None:
    assert pod["priorityClassName"] == "system-node-critical"
    env = {e["name"]: e for e in agent_container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert agent_container["args"] == ["agent", "--node", "$(NODE_NAME)"]
    assert env["NVIDIA_MIG_MONITOR_DEVICES"]["value"] == "all"


def test_containers_drop_privileges(pod: dict[str, Any], agent_container: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    ctx = agent_container["securityContext"]
    # root only to connect to the kubelet's root-owned socket; every capability dropped
    assert (ctx["runAsUser"], ctx["runAsNonRoot"], ctx["privileged"]) == (0, False, False)
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


def test_manifest_matches_the_kubernetes_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (offline Kubernetes schemas)")
    for doc in yaml.safe_load_all(DAEMONSET.read_text()):
        if doc:
            kv.validate(doc, "1.28.0", strict=True)
            kv.validate(doc, kv.latest_version(), strict=True)


# --- docs ---------------------------------------------------------------------------------------------


def test_docs_give_the_one_install_command_for_each() -> None:
    doc = DOC.read_text()
    assert "sudo deploy/systemd/install.sh" in doc
    assert "kubectl apply -f deploy/k8s/agent-daemonset.yaml" in doc
    assert "docker compose up -d" in doc


# --- docs/deploy.md names only files that exist and are tested, and quotes commands that parse ------------

DEPLOY_TESTS = [ROOT / "tests" / name for name in ("test_compose.py", "test_deploy.py", "test_agent_artifact.py")]
NAMED_PATH = re.compile(r"(?<![\w/$.-])(?:\./)?((?:deploy|dashboards|docs|tests|gpufleet)/[\w./-]*"
                        r"|Dockerfile|docker-compose\.yml|Makefile|\.dockerignore|constraints\.txt)")
STACK_FILES = ("deploy/", "Dockerfile", "docker-compose.yml")
"""Named files of the stack itself: the deploy tests must read, run or build each."""


def _named_paths() -> set[str]:
    return {m.rstrip(".,:;)") for m in NAMED_PATH.findall(DOC.read_text())}


def _section(path: Path, heading: str) -> str:
    """The text of `path` under the heading `heading`, up to the next heading of its level or above (code blocks
    skipped, so a `# comment` in one is no heading)."""
    levels, fenced = [], False
    lines = path.read_text().splitlines()
    for line in lines:
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        levels.append(hashes if hashes and not fenced and line[hashes:hashes + 1] == " " else 0)
    (at,) = [i for i, line in enumerate(lines) if levels[i] and line[levels[i] + 1:] == heading]
    end = next((i for i in range(at + 1, len(lines)) if 0 < levels[i] <= levels[at]), len(lines))
    return "\n".join(lines[at + 1:end])


def _doc_commands(text: str | None = None) -> list[list[str]]:
    """The words of each command `text` (default: the doc) quotes: lines of bash and sh blocks (continuations
    joined, comments cut) and inline code spans (wrapped lines joined), split at `&&`, `||`, `|` and `;`."""
    text = DOC.read_text() if text is None else text
    lines = [ln.split(" #")[0] for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.DOTALL)
             for ln in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL).replace("\n", " "))
    return [part.split() for command in lines + spans for part in re.split(r"&&|\|\||\||;", command) if part.split()]


def _help_options(*argv: str) -> set[str]:
    done = run(["bash", *argv, "--help"])
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"--[a-z][a-z-]*", done.stdout))


def _options(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def test_docs_name_only_files_that_exist_and_stack_files_the_tests_read() -> None:
    named = _named_paths()
    assert "deploy/compose/kafka-cluster.yml" in named  # the pattern does find the document's paths
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], "named in docs/deploy.md, not in the repository"
    # What the deploy tests use: the paths they spell (ROOT / "deploy" / "x" joined) and this module's constants.
    spelled = "\n".join(re.sub(r'"\s*/\s*"', "/", t.read_text()) for t in DEPLOY_TESTS)
    constants = {v.relative_to(ROOT).as_posix() for v in globals().values()
                 if isinstance(v, Path) and v.is_relative_to(ROOT)}

    def tested(path: str) -> bool:
        path = path.rstrip("/")
        if (ROOT / path).is_dir():
            return f"{path}/" in spelled or any(c.startswith(f"{path}/") for c in constants)
        return path in spelled or path in constants

    untested = sorted(p for p in named if p.startswith(STACK_FILES) and not tested(p))
    assert untested == [], "named in docs/deploy.md, read by no deploy test"


def _check_commands(commands: list[list[str]]) -> dict[str, int]:
    """Assert that each quoted command of install.sh, make-secrets.sh, make and gpufleet takes the options (and
    make the goals) it is quoted with; return how many of each were checked."""
    import click

    from gpufleet.cli import cli

    install = _help_options(str(INSTALL))
    secrets = _help_options(str(ROOT / "deploy/make-secrets.sh"))
    phony = re.search(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert phony
    targets = set(phony.group(1).split())
    checked = {"install.sh": 0, "make-secrets.sh": 0, "make": 0, "gpufleet": 0}
    for words in commands:
        for i, word in enumerate(words):
            rest = words[i + 1:]
            if word == "install.sh" or word.endswith("/install.sh"):
                assert _options(rest) <= install, (words, _options(rest) - install)
                checked["install.sh"] += 1
            elif word.endswith("make-secrets.sh"):
                assert _options(rest) <= secrets, (words, _options(rest) - secrets)
                checked["make-secrets.sh"] += 1
            elif word == "make" and i == 0 and rest:
                goals = [w for w in rest if not w.startswith("-") and "=" not in w]
                assert set(goals) <= targets, (words, set(goals) - targets)
                checked["make"] += 1
            elif (word == "gpufleet" or word.endswith("/bin/gpufleet")) and (i == 0 or words[i - 1] != "-n"):
                # The command, not `-n gpufleet`: follow its subcommands, then check the options left.
                command: click.Command = cli
                args = list(rest)
                while isinstance(command, click.Group) and args and args[0] in command.list_commands(
                        click.Context(command)):
                    command = command.get_command(click.Context(command), args.pop(0))  # type: ignore[assignment]
                known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
                assert _options(args) <= known, (words, _options(args) - known)
                checked["gpufleet"] += 1
    return checked


def test_docs_quote_only_options_the_scripts_and_commands_take() -> None:
    checked = _check_commands(_doc_commands())
    assert all(checked.values()), checked


def test_docs_create_the_configmap_and_secret_the_daemonset_mounts(manifests: dict[str, dict[str, Any]],
                                                                   pod: dict[str, Any]) -> None:
    assert _created(_doc_commands(), manifests) == _mounted(pod) == {("gpufleet-kafka-ca", "ca.crt"),
                                                                    ("gpufleet-agent", "kafka-password")}


def _mounted(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """(ConfigMap or Secret, key) of each source of the DaemonSet's projected `kafka` volume."""
    (kafka,) = [v for v in pod["volumes"] if v["name"] == "kafka"]
    sources = kafka["projected"]["sources"]
    return {(ref["name"], ref["items"][0]["key"]) for source in sources for ref in source.values()}


def _created(commands: list[list[str]], manifests: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """(name, key) of each ConfigMap and Secret the quoted `kubectl create` commands make (in the manifest's
    namespace)."""
    created = set()
    for words in commands:
        if words[:1] == ["kubectl"] and "create" in words:
            assert words[words.index("-n") + 1] == manifests["Namespace"]["metadata"]["name"], words
            at = words.index("create")
            name = words[at + 3] if words[at + 1] == "secret" else words[at + 2]  # secret generic NAME | configmap NAME
            (source,) = [w for w in words if w.startswith("--from-file=")]
            created.add((name, source.split("=")[1]))
    return created


# --- README.md's install section is docs/deploy.md's ---------------------------------------------------

README = ROOT / "README.md"


def _install_options(commands: list[list[str]]) -> dict[str, str]:
    """The options of the one `sudo deploy/systemd/install.sh` command among `commands`, each with its value."""
    (words,) = [w for w in commands if w[:2] == ["sudo", "deploy/systemd/install.sh"]]
    args = words[2:]
    assert all(a.startswith("--") for a in args[::2]), words
    return dict(zip(args[::2], args[1::2], strict=True))


def _fleet_port() -> str:
    """The port of the brokers' SASL_SSL listener for GPU nodes, from docker-compose.yml."""
    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka"]["environment"]
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    return str(listeners["FLEET"]).rsplit(":", 1)[1]


def test_readme_installs_the_agent_as_docs_deploy_does(manifests: dict[str, dict[str, Any]],
                                                       pod: dict[str, Any]) -> None:
    readme = _section(README, "Installing the agent on GPU nodes")
    commands = _doc_commands(readme)
    checked = _check_commands(commands)
    assert checked["install.sh"] >= 1
    assert checked["make"] >= 1
    ours = _install_options(commands)
    documented = _install_options(_doc_commands(_section(DOC, "Install")))
    assert set(ours) == set(documented) == {"--artifact", "--kafka", "--cluster", "--kafka-ca", "--kafka-password-file"}
    assert ours["--artifact"] == documented["--artifact"] == f"dist/gpufleet-agent-{__version__}-linux-x86_64"
    assert {server.rsplit(":", 1)[1] for server in ours["--kafka"].split(",")} == {_fleet_port()} == {"9094"}
    # The CA and the password are make-secrets.sh's files, copied to the node.
    assert (ours["--kafka-ca"], ours["--kafka-password-file"]) == ("kafka-ca.pem", "kafka_agent_password")
    assert "`secrets/kafka-ca.pem`" in readme
    assert "`secrets/kafka_agent_password`" in readme
    assert ["make", "agent-artifact"] in commands
    assert _created(commands, manifests) == _mounted(pod)
    # Nodes never install from an index by name.
    assert "pip install gpufleet" not in README.read_text()


# --- install.sh's header: its one command works from a copy of deploy/systemd and dist/ ------------------


def _header_command() -> list[str]:
    """The `sudo deploy/systemd/install.sh ...` example of install.sh's header comment, continuations joined."""
    header = [ln.removeprefix("#").strip() for ln in INSTALL.read_text().splitlines()[1:] if ln.startswith("#")]
    text = " ".join(header).replace("\\ ", " ")
    (command,) = re.findall(r"sudo deploy/systemd/install\.sh .*?(?= [A-Z]|$)", text)
    return command.split()


def _copy_for_a_node(tmp_path: Path) -> tuple[Path, Path]:
    """deploy/systemd/, dist/ with a stand-in artifact (SHA-256 beside it), the CA and the password, in a folder
    of their own: what an operator copies to a node. Returns (the copy, the artifact)."""
    node = tmp_path / "node"
    shutil.copytree(SYSTEMD, node / "deploy" / "systemd")
    artifact = node / "dist" / f"gpufleet-agent-{__version__}-linux-{platform.machine()}"
    artifact.parent.mkdir()
    artifact.write_text(f"#!/bin/sh\necho 'gpufleet, version {__version__}'\n")
    artifact.chmod(0o755)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    Path(f"{artifact}.sha256").write_text(f"{digest}  {artifact.name}\n")
    (node / "kafka-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (node / "kafka_agent_password").write_text("s3cret\n")
    return node, artifact


def test_install_header_command_works_from_a_copy_of_deploy_systemd_and_dist(tmp_path: Path) -> None:
    node, artifact = _copy_for_a_node(tmp_path)
    words = _header_command()
    assert _options(words) <= _help_options(str(INSTALL))
    assert "--artifact" in words
    argv = [w.replace("<version>", __version__).replace("<arch>", platform.machine()) for w in words[1:]]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "DESTDIR": str(tmp_path / "root")}
    done = subprocess.run(["bash", *argv], cwd=node, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "root/opt/gpufleet/bin/gpufleet").read_bytes() == artifact.read_bytes()
    assert load(tmp_path / "root/etc/gpufleet/agent.yaml").kafka.bootstrap_servers == "kafka.internal:9094"
    # Without --artifact, the copy has no gpufleet/version.py to name the default by.
    at = argv.index("--artifact")
    bare = subprocess.run(["bash", *argv[:at], *argv[at + 2:]], cwd=node, env={**env, "DESTDIR": str(tmp_path / "r2")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert bare.returncode == 1
    assert "pass --artifact FILE" in bare.stderr


def test_install_with_the_slurm_source_writes_it_and_the_root_drop_in(tmp_path: Path) -> None:
    node, artifact = _copy_for_a_node(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "DESTDIR": str(tmp_path / "root")}
    argv = ["deploy/systemd/install.sh", "--artifact", str(artifact), "--kafka", "k:9094", "--cluster", "hpc",
            "--allocation", "slurm", "--kafka-password-file", "kafka_agent_password"]
    done = subprocess.run(["bash", *argv], cwd=node, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = load(tmp_path / "root/etc/gpufleet/agent.yaml")
    assert (cfg.agent.allocation.source, cfg.agent.allocation.slurm_tenant) == ("slurm", "account")
    installed = tmp_path / "root/etc/systemd/system/gpufleet-agent.service.d/slurm.conf"
    assert installed.read_text() == SLURM_DROPIN.read_text()
    dropin = configparser.ConfigParser(strict=False, interpolation=None)
    dropin.read(installed)
    service = dropin["Service"]
    assert (service["DynamicUser"], service["User"], service["CapabilityBoundingSet"]) == (
        "no", "root", "CAP_SYS_PTRACE")
    bad = subprocess.run(["bash", *argv[:-2], "--allocation", "kubernetes"], cwd=node, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert "use slurm, dcgm_job_dir or none (Kubernetes nodes: deploy/k8s/)" in bad.stderr
