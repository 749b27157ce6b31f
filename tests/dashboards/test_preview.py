"""The offline preview: every panel drawn from the simulated fleet, self-contained, and rendered by a real
headless Chromium without script errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpufleet.dashboards import build, preview
from gpufleet.dashboards.command import dashboards
from tests.dashboards import fleet_data as fd
from tests.dashboards.conftest import Fleet

pytestmark = pytest.mark.integration  # starts a server or a process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BOARDS = [json.loads(p.read_text()) for p in sorted((build.ROOT / build.BOARDS_DIR).glob("*.json"))]
QUERY_PANELS = sum(1 for b in BOARDS for p in b["panels"] if p.get("targets"))


def chromium(page: Path, tmp: Path) -> tuple[str, str]:
    """Load `page` headless; returns (the DOM after scripts ran, Chromium's log with console messages)."""
    assert CHROMIUM
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def page(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preview.write(fleet.client, BOARDS, tmp_path_factory.mktemp("preview"), fd.START_MS, fd.END_MS, "test")


def test_every_panel_is_drawn_with_data(page: Path) -> None:
    text = page.read_text()
    assert text.count('class="panel"') == QUERY_PANELS
    assert 'class="err"' not in text
    assert "no data" not in text
    assert text.count("<svg") >= 25  # charts, not only tables
    assert "<th>gpu_uuid</th>" in text
    assert "gpu_hex" not in text  # the column the GPU links read is hidden
    for board in BOARDS:
        assert f'id="{board["uid"]}"' in text
        for p in board["panels"]:
            if p.get("targets"):
                assert f"<h3>{p['title']}</h3>" in text.replace("&amp;", "&").replace("&#x27;", "'")


def test_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<link" not in text
    assert text.count("<script") == 1
    assert "<script src" not in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed: apt-get install chromium")
def test_chromium_renders_it_without_script_errors(page: Path, tmp_path: Path) -> None:
    dom, log = chromium(page, tmp_path)
    assert 'data-ready="1"' in dom
    assert f'data-panels="{QUERY_PANELS}"' in dom
    assert console_errors(log) == []


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed: apt-get install chromium")
def test_the_script_error_check_sees_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><html><body><script>noSuchFunction();</script></body></html>")
    _, log = chromium(broken, tmp_path)
    assert any("noSuchFunction" in line for line in console_errors(log))


def test_preview_command(fleet: Fleet, tmp_path: Path) -> None:
    result = CliRunner().invoke(dashboards, [
        "preview", "--out", str(tmp_path), "--dsn", fleet.target.dsn, "--database", fleet.target.database,
        "--from", "2026-11-18T10:30:00Z", "--to", "2026-11-18T11:40:00Z",
    ])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "index.html").read_text()
    assert text.count('class="panel"') == QUERY_PANELS
    assert 'class="err"' not in text
    assert "2026-11-18 10:30:00 UTC to 2026-11-18 11:40:00 UTC" in text
