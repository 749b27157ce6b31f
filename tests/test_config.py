"""Configuration: defaults, strict validation with the key named, and docs that cover every key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gpufleet import config

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_key_names_the_section_and_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("agent:\n  intervall_s: 2\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(p)
    assert "unknown field `intervall_s`" in str(err.value)
    assert "`agent`" in str(err.value)
    assert "docs/configuration.md" in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("agent: {interval_s: -1}", "Expected `float` > 0.0 - at `agent.interval_s`"),
        ("billing: {idle_util_ratio: 1.5}", "<= 1.0 - at `billing.idle_util_ratio`"),
        ("kafka: {compression: brotli}", "at `kafka.compression`"),
        ("billing: {exclude_states: [broken]}", "at `billing.exclude_states[0]`"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(p)
    assert fragment in str(err.value)


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("agent: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(p)


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs/configuration.md").read_text()
    defaults = msgspec.to_builtins(config.Config())
    for section, values in defaults.items():
        assert f"## `{section}`" in doc, section
        if isinstance(values, dict) and section != "peak_flops":
            for key, value in values.items():
                if isinstance(value, dict) and key == "allocation":
                    for sub in value:
                        assert f"`allocation.{sub}`" in doc, f"{section}.allocation.{sub}"
                else:
                    assert f"`{key}`" in doc, f"{section}.{key} is not documented"


def test_a_raw_ttl_past_clickhouse_s_datetime_range_is_refused() -> None:
    """A TTL reaching past 2106 wraps in ClickHouse and deletes every raw row at once: refused at load."""
    from gpufleet.config import ConfigError, parse

    assert parse({"clickhouse": {"raw_ttl_days": 3650}}).clickhouse.raw_ttl_days == 3650
    with pytest.raises(ConfigError, match=r"raw_ttl_days"):
        parse({"clickhouse": {"raw_ttl_days": 40000}})
