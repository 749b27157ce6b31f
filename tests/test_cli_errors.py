"""Every failure a user sees is one line and an exit code: the error tree, the CLI's report of it, and the
commands that printed tracebacks (issue 18 item 12: a quote in `--database`, an unreachable or refusing
ClickHouse under `status` and `migrate`).

The commands run through the real entry point (`gpufleet.cli.main`) in this process, against a closed
loopback port and a real HTTP server that refuses as ClickHouse does.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.embedded.broker import free_port
from gpufleet.errors import GpufleetError
from tests.security import EchoingServer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("gpufleet", "agents", "pipeline", "dashboards", "embedded")
PACKAGES = {"gpufleet": "gpufleet", "agents": "gpufleet.agents", "pipeline": "gpufleet.pipeline",
            "dashboards": "gpufleet.dashboards", "embedded": "gpufleet.embedded"}

EXIT_CODES = {
    "gpufleet.errors.ConfigError": 2,
    "gpufleet.errors.UsageError": 2,
    "gpufleet.errors.ServiceError": 2,
    "gpufleet.errors.StoreError": 2,
    "gpufleet.agents.spool.SpoolError": 2,
    "gpufleet.agents.allocation.AllocationFileError": 2,
    "gpufleet.agents.collectors.nvml.NvmlUnavailable": 2,
    "gpufleet.agents.otlp.receiver.ReceiverError": 2,
    "gpufleet.agents.kafka_exporter.ExportError": 1,
    "gpufleet.pipeline.store.migrate.MigrationError": 1,
    "gpufleet.pipeline.store.sharding.UnclassifiedTable": 1,
    "gpufleet.pipeline.queries.billing.BillingError": 1,
    "gpufleet.pipeline.alerts.rules.RulesError": 2,
    "gpufleet.pipeline.alerts.state.StateError": 2,
    "gpufleet.pipeline.alerts.alertmanager.AlertmanagerError": 2,
    "gpufleet.dashboards.deploy.DeployError": 2,
    "gpufleet.embedded.broker.BrokerError": 2,
}
"""Every user-facing error class and the exit code the CLI returns for it (docs/errors.md)."""

INTERNAL = {
    "WireError": "a dead-letter reason stored with the message, never shown as a command's failure",
    "BodyError": "answered to an OTLP client as an HTTP status",
    "GpuError": "answered to an OTLP client as a rejected point",
    "MacroError": "a panel's error inside a preview or validation report",
    "NodeDown": "a collector's signal to the runner: the node's interval becomes a health event",
    "GpuLost": "the NVML funnel's signal to the collector: that GPU's sample carries `error`",
    "LibraryDown": "the NVML funnel's signal to the collector: every GPU in error while NVML is re-initialised",
    "StagingUnsupported": "the ingester falls back to its column path",
    "StatusUnavailable": "answered to a status API client as 503 with the reason",
    "AllocationUnknown": "an allocation source's signal to the agent: the interval's GPUs carry `allocation_unknown`",
    "MetadataUnavailable": "the pod-label lookup's signal: that pod's devices are `Unknown` (billed to nobody)",
    "BatchTaken": "the batch ledger's signal to the ingester: write the batch another consumer entered first",
    "ReplayRefused": "the ingester backs off and retries the partition (IngestStats.last_error and the log say why)",
}
"""Exception classes that never reach a user as a command's failure, and where they end instead."""


def _is_exception(node: ast.ClassDef) -> bool:
    names = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
    return any(n.endswith(("Error", "Exception", "Unavailable")) for n in names)


def _error_classes() -> list[str]:
    """Dotted names of every public exception class in the installed source folders."""
    out = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join([PACKAGES[folder], *path.relative_to(ROOT / folder).with_suffix("").parts])
            module = module.removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and _is_exception(node) and not node.name.startswith("_"):
                    out.append(f"{module}.{node.name}")
    return out


def _load(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_user_facing_error_is_a_gpufleet_error_with_its_exit_code() -> None:
    found = _error_classes()
    assert set(found) - {n for n in found if n.rpartition(".")[2] in INTERNAL} == set(EXIT_CODES) | {
        "gpufleet.errors.GpufleetError"}
    for dotted, code in EXIT_CODES.items():
        cls = _load(dotted)
        assert issubclass(cls, GpufleetError), dotted
        assert cls.exit_code == code, dotted


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from gpufleet.cli import main

    monkeypatch.setattr(sys, "argv", ["gpufleet", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GPUFLEET_CONFIG", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_PASSWORD_FILE", "CLICKHOUSE_USER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no var/demo here: the commands read only what the test names


@pytest.fixture
def refusing_clickhouse() -> Iterator[EchoingServer]:
    server = EchoingServer(403, "Code: 516. DB::Exception: gpufleet: Authentication failed (AUTHENTICATION_FAILED)")
    yield server
    server.close()


def test_a_quote_in_the_database_name_is_one_line(monkeypatch, capsys) -> None:
    code, out, err = run_main(monkeypatch, capsys, "status", "--database", 'x"y')
    assert (code, out) == (2, "")
    assert err == "gpufleet: database name 'x\"y' is not allowed: use letters, digits and '_' (e.g. 'gpufleet')\n"


def test_the_traceback_comes_with_v(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "-v", "status", "--database", 'x"y')
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "gpufleet.errors.StoreError: database name 'x\"y' is not allowed" in err
    assert err.endswith("gpufleet: database name 'x\"y' is not allowed: use letters, digits and '_' (e.g. "
                        "'gpufleet')\n")


@pytest.mark.parametrize("command", ["status", "migrate"])
def test_an_unreachable_clickhouse_is_one_line(command: str, monkeypatch, capsys) -> None:
    port = free_port()
    code, out, err = run_main(monkeypatch, capsys, command, "--dsn", f"http://gpufleet@127.0.0.1:{port}")
    assert (code, out) == (2, "")
    assert err == (f"gpufleet: ClickHouse at http://gpufleet@127.0.0.1:{port} (from --dsn) does not answer "
                   "(Connection refused): check the host and port, and that the server runs and is reachable "
                   "from here\n")


@pytest.mark.integration  # a real HTTP server refusing as ClickHouse does
@pytest.mark.parametrize("command", ["status", "migrate"])
def test_a_refusing_clickhouse_is_one_line(command: str, refusing_clickhouse: EchoingServer, monkeypatch,
                                           capsys) -> None:
    dsn = f"http://gpufleet@127.0.0.1:{refusing_clickhouse.port}"
    code, out, err = run_main(monkeypatch, capsys, command, "--dsn", dsn)
    assert (code, out) == (2, "")
    assert err.startswith(f"gpufleet: cannot open ClickHouse at {dsn} (from --dsn): ")
    assert "AUTHENTICATION_FAILED" in err
    assert err.count("\n") == 1


def test_an_unexpected_error_is_one_line_with_a_hint(capsys) -> None:
    from gpufleet.cli import report

    assert report(ZeroDivisionError("division by zero\nsecond line"), verbose=False) == 1
    assert capsys.readouterr().err == ("gpufleet: unexpected error: ZeroDivisionError: division by zero; rerun "
                                       "with -v for the traceback\n")
