"""The KV tier arguments of EngineConfig: choices, URL check, and a secret kept off the CLI."""

from __future__ import annotations

import argparse

import pytest

from kvserve.config import KV_REMOTE_SECRET_ENV, EngineConfig


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"kv_restore": "sometimes"}, "kv_restore"),
        ({"kv_remote_url": "http://127.0.0.1:6379"}, "kv_remote_url"),
        ({"preemption_mode": "swap"}, "preemption_mode"),
        ({"preemption_mode": "evict"}, "preemption_mode"),
    ],
)
def test_bad_tier_arguments_name_the_field(args: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(**args)  # type: ignore[arg-type]


def test_swap_is_accepted_with_any_tier() -> None:
    assert EngineConfig(preemption_mode="swap", kv_cpu_bytes=1 << 20).has_kv_tiers
    assert EngineConfig(preemption_mode="swap", kv_remote_url="redis://127.0.0.1:1/0")
    assert not EngineConfig().has_kv_tiers


def test_the_remote_secret_comes_from_the_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    assert "--kv-remote-secret" not in parser.format_help()
    monkeypatch.setenv(KV_REMOTE_SECRET_ENV, "s3cret")
    config = EngineConfig.from_cli_args(parser.parse_args(["--kv-restore", "never"]))
    assert config.kv_remote_secret == "s3cret"
    assert config.kv_restore == "never"
    assert "s3cret" not in repr(config)
    monkeypatch.delenv(KV_REMOTE_SECRET_ENV)
    assert EngineConfig.from_cli_args(parser.parse_args([])).kv_remote_secret is None
