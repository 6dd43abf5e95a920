"""EndpointSpec, Work and RoutingConfig: values with validation."""

from __future__ import annotations

import dataclasses

import pytest

from schemas.settings import EndpointSettings
from workers.routing import EndpointSpec, RoutingConfig, Work


def test_from_settings_keeps_what_routing_needs() -> None:
    settings = EndpointSettings(
        name="gpu-1",
        base_url="http://127.0.0.1:9000/v1",
        models={"llama": "meta/llama-3", "qwen": {"upstream": "qwen2"}},
        max_concurrency=8,
        rpm=600,
        tpm=100_000,
        timeout_s=120,
    )
    spec = EndpointSpec.from_settings(settings)
    assert spec.name == "gpu-1"
    assert dict(spec.models) == {"llama": "meta/llama-3", "qwen": "qwen2"}
    assert (spec.max_concurrency, spec.rpm, spec.tpm, spec.timeout_s) == (8, 600, 100_000, 120)


def test_spec_is_an_immutable_value() -> None:
    models = {"m": "m"}
    spec = EndpointSpec("a", models, 4)
    models["n"] = "n"
    assert dict(spec.models) == {"m": "m"}
    with pytest.raises(TypeError):
        spec.models["x"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "b"  # type: ignore[misc]
    assert Work(1, None) == Work(1, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": {}}, "serves no model"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"rpm": 0}, "rpm and tpm"),
        ({"tpm": 0}, "rpm and tpm"),
        ({"timeout_s": 0.0}, "timeout_s"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "a", "models": {"m": "m"}, "max_concurrency": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        EndpointSpec(**args)  # type: ignore[arg-type]


def test_config_defaults_follow_the_reference() -> None:
    cfg = RoutingConfig()
    assert (cfg.tau_s, cfg.eject_after, cfg.eject_base_s, cfg.eject_max_s) == (10, 5, 30, 300)
    assert (cfg.eject_jitter, cfg.max_eject_fraction, cfg.retry_after_cap_s) == (0.2, 0.5, 300)
    assert (cfg.budget_ratio, cfg.budget_min_per_s, cfg.budget_ttl_s) == (0.2, 10, 10)
    assert (cfg.max_attempts, cfg.hedge_min_samples, cfg.timeout_pad) == (3, 20, 2.0)
    assert cfg.default_timeout_per_token_s * 128_000 == pytest.approx(3600)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau_s": -1.0}, "tau_s must be >= 0"),
        ({"tau_s": 0.0}, "tau_s must be > 0"),
        ({"hedge_quantile": 1.5}, r"hedge_quantile must be in \(0, 1\]"),
        ({"max_eject_fraction": 0.0}, "max_eject_fraction"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**kwargs)  # type: ignore[arg-type]
