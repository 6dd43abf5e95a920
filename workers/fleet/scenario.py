"""The fleet's scenario file: which fake upstreams to serve and how they misbehave.

A scenario is TOML parsed into frozen pydantic models that forbid unknown
keys, so a typo (``eror_rate``) fails loudly instead of silently serving a
healthy endpoint. docs/fleet.md documents every field. The scenarios that
ship with llmq (``demo``, ``faults``, ``zero``) are package data in
``workers/fleet/scenarios/``, so an installed wheel has them too.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Endpoint",
    "Latency",
    "Scenario",
    "ScenarioError",
    "TokenRange",
    "Window",
    "load_scenario",
    "scenario_file",
    "shipped_scenarios",
]

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction of requests, 0 to 1."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_FAULTS = ("rate_limit_rate", "hang_rate", "error_rate", "malformed_rate")
"""The rates that pick one outcome each; together they may not exceed 1."""


class ScenarioError(ValueError):
    """The scenario file is invalid; ``str()`` has one line per problem, naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latency(_Strict):
    """Time to first byte: a lognormal fitted to a median and a 99th percentile.

    A bare number (``latency_ms = 50``) means a constant, as does p99 == median.
    """

    median: float = Field(ge=0.0)
    p99: float = Field(ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return {"median": data, "p99": data}
        if isinstance(data, dict) and "median" in data and "p99" not in data:
            return {**data, "p99": data["median"]}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Latency:
        if self.p99 < self.median:
            raise ValueError(f"p99 ({self.p99}) must be >= median ({self.median})")
        if self.median == 0 and self.p99 > 0:
            raise ValueError("a lognormal needs median > 0 when p99 > 0")
        return self


class TokenRange(_Strict):
    """Completion length, uniform in [min, max]; a bare number means exactly that many."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"min": data, "max": data}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> TokenRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class Window(_Strict):
    """A span of fleet time (seconds since the fleet started) with overrides.

    With ``every_s`` the window repeats: active when
    ``(t - start_s) mod every_s < end_s - start_s`` for ``t >= start_s``.
    Rates left unset keep the endpoint's value.
    """

    start_s: float = Field(ge=0.0)
    end_s: float
    every_s: float | None = Field(default=None, gt=0.0)
    latency_x: float = Field(default=1.0, ge=0.0)
    down: bool = False
    error_rate: Rate | None = None
    rate_limit_rate: Rate | None = None
    hang_rate: Rate | None = None
    malformed_rate: Rate | None = None
    no_usage_rate: Rate | None = None
    stream_cut_rate: Rate | None = None

    @model_validator(mode="after")
    def _span(self) -> Window:
        if self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be > start_s ({self.start_s})")
        if self.every_s is not None and self.every_s <= self.end_s - self.start_s:
            raise ValueError(
                f"every_s ({self.every_s}) must be longer than the window"
                f" ({self.end_s - self.start_s} s), or it would never end"
            )
        return self


class Endpoint(_Strict):
    """One fake upstream: its port, models, latency and fault rates."""

    name: str = Field(pattern=_NAME)
    kind: Literal["openai", "azure", "anthropic"] = "openai"
    """The provider it fakes: ``openai`` serves ``/v1/chat/completions`` and
    ``/v1/embeddings`` behind ``Authorization: Bearer``; ``azure`` serves
    ``/openai/deployments/{model}/chat/completions?api-version=...`` (and
    ``/embeddings``) behind an ``api-key`` header (or an Entra ID bearer
    token), with Azure's error shapes; ``anthropic`` serves ``/v1/messages``
    behind ``x-api-key`` and ``anthropic-version``, as strict as Anthropic's
    reference (workers/fleet/anthropic_wire.py), with its error shapes
    (``error_status = 529`` is ``overloaded_error``) and prompt caching."""
    port: int = Field(default=0, ge=0, le=65535)
    """0 picks a free port at start (tests); fixed ports suit the demo."""
    models: tuple[str, ...] = Field(min_length=1)
    """The model names it serves (for azure: its deployment names). Every model
    answers both chat completions and embeddings."""
    api_key: str | None = None
    """None inherits the scenario's key; "" turns the check off for this endpoint."""
    echo_key: Literal["none", "masked", "full"] = "none"
    """What a 401 says of the key it got: nothing, OpenAI's masked form
    (``sk-abc****wxyz``), or all of it, like a careless relay (secret tests).
    Azure never echoes a key; an azure endpoint does here, for the same tests."""
    latency_ms: Latency = Latency(median=0.0, p99=0.0)
    """Time to first byte; for a stream, time to its first token."""
    ms_per_token: float = Field(default=0.0, ge=0.0)
    """Per output token: added to a whole answer's time, or the mean gap
    between a stream's tokens."""
    token_jitter: float = Field(default=0.25, ge=0.0, le=1.0)
    """Streams only: each gap between tokens is ``ms_per_token`` times a
    uniform factor in [1 - jitter, 1 + jitter]."""
    ms_per_input_token: float = Field(default=0.01, ge=0.0)
    """Embeddings only: time per input token on top of the latency, so a
    bigger input takes longer (8,000 tokens: 80 ms by default)."""
    output_tokens: TokenRange = TokenRange(min=16, max=256)
    error_rate: Rate = 0.0
    error_status: int = Field(default=500, ge=500, le=599)
    rate_limit_rate: Rate = 0.0
    retry_after_s: float = Field(default=1.0, ge=0.0)
    hang_rate: Rate = 0.0
    hang_max_s: float = Field(default=600.0, gt=0.0)
    malformed_rate: Rate = 0.0
    no_usage_rate: Rate = 0.0
    stream_cut_rate: Rate = 0.0
    """Fraction of successful streams cut mid-way: the connection is closed
    after some tokens, without a finish chunk or ``[DONE]``."""
    drip_s: float = Field(default=0.0, ge=0.0)
    drip_chunks: int = Field(default=8, ge=1, le=1000)
    capacity: int = Field(default=0, ge=0)
    over_capacity: Literal["queue", "429"] = "queue"
    windows: tuple[Window, ...] = ()
    record: int = Field(default=0, ge=0, le=10_000)
    """Keep the last ``record`` requests (method, path, query, headers, body) for
    tests to check what a client sent: ``Fleet.seen(name)``. 0 keeps none."""

    @model_validator(mode="after")
    def _faults_fit(self) -> Endpoint:
        _check_fault_sum(self.model_dump(include=set(_FAULTS)), "")
        for i, window in enumerate(self.windows):
            merged = {f: getattr(window, f) for f in _FAULTS if getattr(window, f) is not None}
            _check_fault_sum({**self.model_dump(include=set(_FAULTS)), **merged}, f"windows.{i}: ")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a name twice: {list(self.models)}")
        return self


def _check_fault_sum(rates: dict[str, float], where: str) -> None:
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"{where}{' + '.join(_FAULTS)} must be <= 1 (got {total:g})")


class Scenario(_Strict):
    """A whole fleet: a seed, a default API key and the endpoints."""

    seed: int = 0
    api_key: str | None = None
    """The Bearer token every endpoint expects; None (absent) skips the check."""
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Scenario:
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique: {names}")
        ports = [e.port for e in self.endpoints if e.port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"endpoint ports must be unique: {ports}")
        return self

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint called ``name``; KeyError names the known ones."""
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise KeyError(f"no endpoint {name!r}; known: {[e.name for e in self.endpoints]}")

    def key_for(self, endpoint: Endpoint) -> str | None:
        """The key ``endpoint`` checks, or None when it accepts any request."""
        key = self.api_key if endpoint.api_key is None else endpoint.api_key
        return key or None

    def with_ephemeral_ports(self) -> Scenario:
        """A copy on free ports, so tests can run a shipped scenario beside the demo."""
        endpoints = tuple(e.model_copy(update={"port": 0}) for e in self.endpoints)
        return self.model_copy(update={"endpoints": endpoints})


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate a scenario TOML file.

    Raises :class:`ScenarioError` with one line per problem, each naming the
    field (``endpoints.0 (fast).latency_ms: ...``) and the file.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"scenario error: cannot read {file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario error: {file}: invalid TOML: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_describe(exc, data, file)) from None


def shipped_scenarios() -> tuple[str, ...]:
    """The names of the scenarios that ship with llmq, sorted (``demo``, ``faults``, ...)."""
    names = (f.name for f in _shipped().iterdir() if f.name.endswith(".toml"))
    return tuple(sorted(name.removesuffix(".toml") for name in names))


@contextlib.contextmanager
def scenario_file(spec: str | os.PathLike[str]) -> Iterator[Path]:
    """A path to read ``spec`` from: the file ``spec``, else the shipped scenario so named.

    An existing file wins over a shipped name. Raises :class:`ScenarioError`
    naming the shipped scenarios when ``spec`` is neither.
    """
    path = Path(spec)
    if path.is_file():
        yield path
        return
    shipped = shipped_scenarios()
    if str(spec) not in shipped:
        raise ScenarioError(
            f"scenario error: {spec}: no such file, nor a shipped scenario ({', '.join(shipped)})"
        )
    # as_file: a real path even when the package is imported from a zip archive.
    with resources.as_file(_shipped() / f"{spec}.toml") as file:
        yield file


def _shipped() -> Traversable:
    return resources.files(__name__.rpartition(".")[0]) / "scenarios"


def _describe(exc: ValidationError, data: dict[str, Any], file: Path) -> str:
    """One line per pydantic error, with endpoint numbers followed by their names."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        parts = [str(p) for p in err["loc"]]
        if len(parts) >= 2 and parts[0] == "endpoints" and parts[1].isdigit():
            name = _endpoint_name(data, int(parts[1]))
            if name:
                parts[1] = f"{parts[1]} ({name})"
        loc = ".".join(parts) or "scenario"
        lines.append(f"scenario error: {loc}: {err['msg']} (in {file})")
    return "\n".join(lines)


def _endpoint_name(data: dict[str, Any], index: int) -> str | None:
    endpoints = data.get("endpoints")
    if isinstance(endpoints, list) and index < len(endpoints):
        entry = endpoints[index]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            return str(entry["name"])
    return None
