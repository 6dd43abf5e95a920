"""Configuration: a TOML file (``llmq.toml``) overlaid by ``LLMQ_*`` variables.

The file names endpoints, models and limits; secrets never live in it. An
endpoint names the *environment variable* that holds its API key, and the key
is read into a ``SecretStr`` at load time. ``load_settings`` turns every
problem into a :class:`ConfigError` whose text is one line per problem,
naming the field.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas import broker_urls
from schemas import endpoint_rules as rules
from schemas.contract import SlaClass

__all__ = [
    "BrokerSettings",
    "BudgetSettings",
    "BudgetsSettings",
    "ClassSettings",
    "ConfigError",
    "EndpointModel",
    "EndpointSettings",
    "GatewaySettings",
    "MetricsSettings",
    "ModelSettings",
    "Settings",
    "TenancySettings",
    "TopologySettings",
    "WorkerSettings",
    "load_settings",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""An environment variable's name."""


class ConfigError(Exception):
    """The configuration is invalid; ``str()`` is ready to print."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Strict):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    """AMQP URL (``amqp://`` or ``amqps://``), or several separated by commas: the
    nodes of one cluster (``schemas/broker_urls.py``). May hold a password, so
    secret. Once loaded it holds every address, also when ``urls`` gave them."""
    urls: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """The same addresses as a list (set ``url`` or ``urls``, not both); the
    variable takes a comma-separated list too. Read :attr:`addresses`."""
    heartbeat_s: int = Field(default=30, ge=0, le=600)
    management_url: str | None = None
    """Optional management API (``http://host:15672``) for ``llmq status``."""

    @field_validator("url")
    @classmethod
    def _amqp_urls(cls, value: SecretStr) -> SecretStr:
        broker_urls.check_urls(broker_urls.split_urls(value.get_secret_value()))
        return value

    @field_validator("urls", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        if isinstance(value, str):  # LLMQ_BROKER__URLS: a JSON list or a comma-separated one
            text = value.strip()
            return orjson.loads(text) if text.startswith("[") else broker_urls.split_urls(text)
        return value

    @field_validator("urls")
    @classmethod
    def _one_cluster(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if value:
            broker_urls.check_urls([u.get_secret_value() for u in value])
        return value

    @model_validator(mode="after")
    def _one_list(self) -> BrokerSettings:
        if not self.urls:
            return self
        if "url" in self.model_fields_set:
            raise ValueError(
                "broker.url and broker.urls are both set: give the addresses in one"
                " of them (broker.url takes a comma-separated list)"
            )
        # ``url`` too holds every address, so a caller that connects with it
        # reaches every node. Frozen model: set the field as pydantic's init does.
        object.__setattr__(self, "url", SecretStr(",".join(self.addresses)))
        return self

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address, as written (secret: show only ``broker_urls.node_of`` of one)."""
        if self.urls:
            return tuple(u.get_secret_value() for u in self.urls)
        return broker_urls.split_urls(self.url.get_secret_value())


class ClassSettings(_Strict):
    default_sla_ms: int = Field(ge=1)
    hedge: bool = False
    max_length: int = Field(default=100_000, ge=1)
    """Ready jobs the queue holds before publishers are refused (backpressure)."""


def _default_classes() -> dict[str, ClassSettings]:
    return {
        SlaClass.INTERACTIVE.value: ClassSettings(default_sla_ms=30_000, hedge=True),
        SlaClass.BATCH.value: ClassSettings(default_sla_ms=3_600_000, max_length=1_000_000),
    }


class TopologySettings(_Strict):
    jobs_exchange: str = Field(default="llmq.jobs", pattern=_NAME)
    dead_exchange: str = Field(default="llmq.dlx", pattern=_NAME)
    dead_queue: str = Field(default="llmq.dead", pattern=_NAME)
    dead_max_length: int = Field(default=1_000_000, ge=1)
    queue_prefix: str = Field(default="llmq.q.", max_length=200)
    delivery_limit: int = Field(default=5, ge=1, le=1000)
    """Deliveries of one job before the broker dead-letters it (poison guard)."""
    state_exchange: str = Field(default="llmq.state", pattern=_NAME)
    """Fanout exchange the workers share their state, health and spend on."""
    spend_stream: str = Field(default="llmq.spend", pattern=_NAME)
    """Stream the workers keep the month's spend in across restarts (workers/spend_store.py)."""
    classes: dict[str, ClassSettings] = Field(default_factory=_default_classes)

    def queue_name(self, sla_class: str) -> str:
        return f"{self.queue_prefix}{sla_class}"

    @field_validator("classes", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        # A file that tunes one class must not silently drop the other class
        # or reset the defaults it does not mention (interactive's hedge).
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_classes().items()}
        for name, spec in value.items():
            base = merged.get(name)
            merged[name] = {**base, **spec} if isinstance(spec, dict) and base else spec
        return merged

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: dict[str, ClassSettings]) -> dict[str, ClassSettings]:
        unknown = set(value) - {c.value for c in SlaClass}
        if unknown:
            raise ValueError(f"unknown SLA class {sorted(unknown)[0]!r}; use interactive, batch")
        return value


class EndpointModel(_Strict):
    """A model as one endpoint serves it."""

    upstream: str = Field(min_length=1, max_length=256)
    """The model name the endpoint expects."""
    kind: Literal["chat", "embedding"] = "chat"
    """What the model does: jobs of this kind (``JobKind``) are routed to it."""
    # Prices, USD per million tokens: unset, the endpoint's, else the price
    # catalogue's (workers/prices.py, docs/configuration.md "Prices").
    input_per_mtok: float | None = Field(default=None, ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)
    """Input tokens read from the provider's prompt cache (unset and unlisted: the input price)."""
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    """Input tokens written to the prompt cache (unset and unlisted: the input price)."""
    output_per_mtok: float | None = Field(default=None, ge=0)
    price_model: str | None = Field(default=None, min_length=1, max_length=256)
    """The price catalogue's name for the model when ``upstream`` is not it (an
    Azure deployment, a self-hosted copy of a listed model)."""
    price_provider: str | None = Field(default=None, pattern=_NAME)
    """The catalogue's provider to price the model at (``openai``, ``anthropic``,
    ``azure``, ``groq``, …), before the endpoint's."""


class EndpointSettings(_Strict):
    # Field order matters: the validators of later fields read ``kind`` (info.data).
    name: str = Field(pattern=_NAME)
    kind: Literal["openai", "azure", "anthropic"] = "openai"
    """The provider's wire format (``workers/providers/``): ``openai`` (OpenAI and
    every OpenAI-compatible server: vLLM, relays), ``azure`` (Azure OpenAI:
    deployment URLs, ``api-version``, ``api-key``), ``anthropic`` (the native
    Messages API)."""
    base_url: str
    """openai: the base URL up to and including ``/v1``. azure: the resource root
    (``https://NAME.openai.azure.com``, optionally ending in ``/openai``), never a
    deployment URL: the deployment is ``models.X.upstream``. Never a query string
    (``api_version``, ``query``) nor credentials (``api_key_env``)."""
    api_key_env: str | None = Field(default=None, pattern=_ENV)
    """Name of the environment variable holding the API key (never the key). Sent
    as ``Authorization: Bearer`` (openai), ``api-key`` (azure), ``x-api-key`` (anthropic)."""
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Filled from ``api_key_env`` at load time; setting it in the file is refused."""
    azure_ad_token_env: str | None = Field(default=None, pattern=_ENV)
    """azure only, instead of ``api_key_env``: the environment variable holding a
    Microsoft Entra ID access token, sent as ``Authorization: Bearer``. Read once
    at start-up (tokens expire: restart the worker with a fresh one)."""
    azure_ad_token: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Filled from ``azure_ad_token_env`` at load time; setting it in the file is refused."""
    api_version: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$", validate_default=True
    )
    """azure: required, the ``api-version`` query parameter of every call
    (``"2024-10-21"``). Refused for kind openai (use ``query``)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers sent on every call, e.g. ``{ "OpenAI-Organization" = "org-1" }``.
    Not secret (use ``secret_headers``); cannot replace ``Content-Type`` or the
    header that carries this kind's key."""
    secret_headers: dict[str, str] = Field(default_factory=dict)
    """Header name → environment variable holding its value (never the value),
    read at load time like ``api_key_env`` and kept out of logs, replies and errors."""
    secret_header_values: dict[str, SecretStr] = Field(
        default_factory=dict, exclude=True, repr=False
    )
    """Filled from ``secret_headers`` at load time; setting it in the file is refused."""
    query: dict[str, str] = Field(default_factory=dict)
    """Extra query parameters on every call's URL (not secret)."""
    models: dict[str, EndpointModel]
    """Canonical model name → how this endpoint serves it (or just its upstream name)."""
    max_concurrency: int = Field(default=64, ge=1, le=100_000)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    input_per_mtok: float | None = Field(default=None, ge=0)
    """USD per million prompt tokens for the models whose entry sets none; unset:
    the price catalogue's (docs/configuration.md, "Prices")."""
    cached_input_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    output_per_mtok: float | None = Field(default=None, ge=0)
    price_provider: str | None = Field(default=None, pattern=_NAME)
    """The price catalogue's provider whose list prices apply to this endpoint's
    models (a relay in front of OpenAI: ``"openai"``); unset, its kind's or its
    host's, else none (a self-hosted server is not looked up)."""
    timeout_s: float = Field(default=600.0, gt=0, le=3600)
    """Upper bound of one attempt, whatever the deadline."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials; use api_key_env")
        rules.check_base_url(value, info.data.get("kind"))
        return value.rstrip("/")

    @field_validator("azure_ad_token_env")
    @classmethod
    def _ad_token(cls, value: str | None, info: ValidationInfo) -> str | None:
        rules.check_ad_token(value, info.data.get("kind"), info.data.get("api_key_env"))
        return value

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str | None, info: ValidationInfo) -> str | None:
        rules.check_api_version(value, info.data.get("kind"))
        return value

    @field_validator("headers", "secret_headers", "query", mode="before")
    @classmethod
    def _json_table(cls, value: Any) -> Any:
        # LLMQ_ENDPOINTS__0__HEADERS='{"X-A": "1"}' arrives as a string (see models).
        if isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.loads(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        rules.check_header_names(value, info.data.get("kind"))
        rules.check_header_values(value)
        return value

    @field_validator("secret_headers")
    @classmethod
    def _secret_headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        rules.check_header_names(value, info.data.get("kind"))
        plain = {h.lower() for h in info.data.get("headers", {})}
        for name, env in value.items():
            if name.lower() in plain:
                raise ValueError(f"{name!r} is also in headers; set it in one of them")
            if not re.match(_ENV, env):
                raise ValueError(f"{name}: {env[:64]!r} is not an environment variable name")
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        rules.check_query(value, info.data.get("kind"))
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(("[", "{")):
            # LLMQ_ENDPOINTS__0__MODELS='["m"]': inside a list, pydantic-settings
            # cannot see the field's type and hands the JSON over as a string.
            with contextlib.suppress(orjson.JSONDecodeError):
                value = orjson.loads(value)
        if isinstance(value, list):
            value = {name: name for name in value}
        if isinstance(value, dict):
            return {k: {"upstream": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("models")
    @classmethod
    def _some_models(
        cls, value: dict[str, EndpointModel], info: ValidationInfo
    ) -> dict[str, EndpointModel]:
        if not value:
            raise ValueError("an endpoint must serve at least one model")
        rules.check_model_kinds({m: e.kind for m, e in value.items()}, info.data.get("kind"))
        return value


class ModelSettings(_Strict):
    aliases: list[str] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    """Models tried, in order, when no endpoint of this one is usable (down, ejected,
    cooling down, unusable) — not when it is merely at capacity: then jobs wait."""
    overflow_to: list[str] = Field(default_factory=list)
    """Models tried, in order, when this one is at capacity (an endpoint full or out
    of rpm/tpm for now), before waiting for it."""
    max_output_tokens: int | None = Field(default=None, ge=1)
    """The most ``max_tokens`` / ``max_completion_tokens`` a job may ask for."""
    max_n: int = Field(default=8, ge=1, le=128)
    """The most completions (``n``) one job may ask for: each is billed."""


class WorkerSettings(_Strict):
    concurrency: int = Field(default=256, ge=1, le=100_000)
    """Interactive jobs one worker holds at once (the interactive consumer's
    prefetch); batch jobs are held besides, ``batch_share`` of this."""
    batch_share: float = Field(default=0.5, gt=0, lt=1)
    """Batch jobs one worker holds, as a share of ``concurrency`` (at least one),
    besides the interactive ones."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=10)
    retry_budget_min_per_s: float = Field(default=10.0, ge=0)
    deadline_margin_ms: int = Field(default=300, ge=0)
    """Time kept back from each deadline to publish the reply."""
    eject_base_s: float = Field(default=5.0, gt=0, le=3600)
    """First ejection of a failing endpoint; doubles with each re-ejection (cap 300 s).
    Short because a half-open probe is one request: a 4 s outage should not cost
    30 s of the best endpoint (Envoy's default, kept by the routing core)."""
    grace_s: float = Field(default=30.0, ge=0)
    """How long in-flight jobs may finish after SIGTERM before being requeued."""
    http_transport: Literal["aiohttp", "httpx", "httpx-aiohttp"] = "aiohttp"
    name: str | None = None
    """Worker name in dead letters and status; defaults to host:pid."""
    state_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often the worker publishes its state on ``topology.state_exchange``."""
    max_sla_ms: int = Field(default=3_600_000, ge=1, le=7 * 24 * 3600 * 1000)
    """No job's deadline is later than its publish time plus this (an hour: the
    batch default). The broker's ``consumer_timeout`` must exceed it."""
    reply_queues: tuple[str, ...] = ("llmq.reply.*",)
    """Queues a job's ``reply_to`` may name (``*`` matches any characters). The
    worker publishes only to these; llmq's own queues never match."""
    strict_preflight: bool = False
    """Refuse to start when a start-up check (consumer timeout) finds a problem."""
    stream_flush_ms: float = Field(default=20.0, ge=0, le=10_000)
    """A streamed answer's chunks wait at most this long for company before they
    go to the caller as one message (the first token never waits)."""
    stream_flush_tokens: int = Field(default=16, ge=1, le=100_000)
    """...or until this many tokens are held."""
    stream_gap_s: float = Field(default=60.0, gt=0, le=3600)
    """A stream silent for this long mid-answer is broken (the job's deadline
    bounds the whole stream as well)."""

    @field_validator("reply_queues")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not 0 < len(pattern) <= 255 or not pattern.isprintable():
                raise ValueError(f"{pattern[:40]!r} is not a queue name pattern")
            if pattern.strip("*") == "":
                raise ValueError("a pattern of only '*' would let jobs name any queue")
        return value


class TenancySettings(_Strict):
    """Who a job is billed to: never simply what the job says.

    The tenant of a job published over AMQP comes from the broker user that
    published it (the ``user_id`` property, which RabbitMQ checks against the
    connection's user), mapped through ``users``; the ``tenant`` header is
    believed only from the broker users in ``trust_header_from`` (the gateway's,
    which takes tenants from API keys). Anything else is billed to ``default``.
    """

    users: dict[str, str] = Field(default_factory=dict)
    """Broker user → tenant."""
    trust_header_from: tuple[str, ...] = ()
    """Broker users whose jobs' ``tenant`` header is believed; ``*`` means any
    producer (the old behaviour: tenants name themselves)."""
    default: str | None = None
    """The tenant of jobs no rule names (None: no tenant, no tenant budget)."""


class GatewaySettings(_Strict):
    """``llmq gateway``: the OpenAI-compatible HTTP front door."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_keys_env: str | None = Field(
        default="LLMQ_GATEWAY_KEYS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"
    )
    """Environment variable holding the callers' keys, comma-separated (never the keys)."""
    api_keys: tuple[SecretStr, ...] = Field(default=(), exclude=True, repr=False)
    """Filled from ``api_keys_env`` at start-up."""
    tenants: dict[str, str] = Field(default_factory=dict)
    """Tenant → environment variable holding that tenant's keys, comma-separated:
    a request with one of them is billed to the tenant (never the keys)."""
    tenant_keys: dict[str, tuple[SecretStr, ...]] = Field(
        default_factory=dict, exclude=True, repr=False
    )
    """Filled from ``tenants`` at start-up."""
    trust_tenant_header: bool = False
    """Let ``X-LLMQ-Tenant`` choose the tenant (only behind a proxy that sets it)."""
    require_auth: bool = True
    """Refuse to start without keys; false only for a trusted local network."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    default_sla_ms: int = Field(default=30_000, ge=1)
    max_sla_ms: int = Field(default=600_000, ge=1)
    sla_class: str = "interactive"
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """A request's line and headers must arrive in full within this, counted from
    the connection opening or from the request's first byte."""
    idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """A keep-alive connection with no request in progress is closed after this."""
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """A request body must arrive in full within this (else 408)."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Open client connections; past it new ones get 503 and are closed at once."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the gateway's ``/metrics`` (None: not served; never on ``port``)."""

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, str]) -> dict[str, str]:
        for tenant, env in value.items():
            if not 0 < len(tenant) <= 256 or not tenant.isprintable():
                raise ValueError(f"{tenant[:40]!r}: a tenant is 1 to 256 printable characters")
            if not (env.isascii() and env.isidentifier()):
                raise ValueError(f"{tenant}: {env[:40]!r} is not an environment variable name")
        return value


class MetricsSettings(_Strict):
    """The worker's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    """0 picks a free port (tests); the bound port is ``Worker.metrics_port``."""
    max_tenants: int = Field(default=100, ge=0, le=10_000)
    """Distinct ``tenant`` label values. Configured tenants always have their own;
    the slots left go first-come, and later tenants are counted as ``(other)``."""


class BudgetSettings(_Strict):
    """One monthly budget (UTC calendar month)."""

    monthly_usd: float = Field(gt=0)
    hard_cap: bool = False
    """Once spent, answer ``over_budget`` instead of calling an upstream."""


class BudgetsSettings(_Strict):
    thresholds: tuple[float, ...] = (0.5, 0.75, 0.9)
    """Fractions of a budget at which to alert, once per month each."""
    models: dict[str, BudgetSettings] = Field(default_factory=dict)
    """Canonical model name → its monthly budget, across all tenants."""
    tenants: dict[str, BudgetSettings] = Field(default_factory=dict)
    """Tenant (the job's ``tenant`` header) → its monthly budget, across all models."""

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < t < 1 for t in value):
            raise ValueError("each threshold is a fraction between 0 and 1 (exclusive)")
        return tuple(sorted(set(value)))


class Settings(BaseSettings):
    """Everything llmq reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="LLMQ_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    topology: TopologySettings = Field(default_factory=TopologySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    endpoints: list[EndpointSettings] = Field(default_factory=list)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    budgets: BudgetsSettings = Field(default_factory=BudgetsSettings)
    tenancy: TenancySettings = Field(default_factory=TenancySettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(_TomlSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _indexed_endpoints(cls, value: Any) -> Any:
        # The TOML source hands the list over keyed by index (see _TomlSource)
        # so that LLMQ_ENDPOINTS__<i>__<FIELD> merges into endpoint i.
        if not (isinstance(value, dict) and all(str(k).isdigit() for k in value)):
            return value
        indexed = {int(k): v for k, v in value.items()}
        if sorted(indexed) != list(range(len(indexed))):
            missing = min(set(range(max(indexed) + 1)) - set(indexed))
            raise ValueError(
                f"endpoint {max(indexed)} is set but endpoint {missing} is not"
                " (indexes count from 0 without gaps)"
            )
        return [indexed[i] for i in range(len(indexed))]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # Each message starts with the field's path: load_settings prints it as is.
        seen_names: set[str] = set()
        for i, endpoint in enumerate(self.endpoints):
            if endpoint.name in seen_names:
                raise ValueError(f"endpoints.{i}.name: {endpoint.name!r} is used twice")
            seen_names.add(endpoint.name)
        served = {m for e in self.endpoints for m in e.models}
        kinds: dict[str, str] = {}
        for i, endpoint in enumerate(self.endpoints):
            if len({entry.kind for entry in endpoint.models.values()}) > 1:
                # Its latency fit and its limits would mix two workloads an
                # order of magnitude apart: providers limit them apart too.
                raise ValueError(
                    f"endpoints.{i}.models: serves chat and embedding models; declare the"
                    " embedding models on an endpoint of their own (same base_url)"
                )
            for model, entry in endpoint.models.items():
                if kinds.setdefault(model, entry.kind) != entry.kind:
                    raise ValueError(
                        f"endpoints.{i}.models.{model}.kind: {entry.kind!r}, but another"
                        f" endpoint serves {model!r} as {kinds[model]!r} (one kind a model)"
                    )
        seen: dict[str, str] = {}
        for model, spec in self.models.items():
            for alias in spec.aliases:
                where = f"models.{model}.aliases"
                if alias in served or alias in self.models:
                    raise ValueError(f"{where}: alias {alias!r} is itself a model name")
                if alias in seen:
                    raise ValueError(f"{where}: alias {alias!r} is also given to {seen[alias]!r}")
                seen[alias] = model
            for field, others in (("fallbacks", spec.fallbacks), ("overflow_to", spec.overflow_to)):
                for other in others:
                    if other not in served:
                        raise ValueError(f"models.{model}.{field}: no endpoint serves {other!r}")
                    if model in kinds and kinds[other] != kinds[model]:
                        raise ValueError(
                            f"models.{model}.{field}: {other!r} is a {kinds[other]} model,"
                            f" {model!r} a {kinds[model]} model"
                        )
            if spec.overflow_to and model not in served:
                raise ValueError(
                    f"models.{model}.overflow_to: no endpoint serves {model!r} itself, so it"
                    " is never at capacity (use fallbacks)"
                )
            if model in spec.overflow_to:
                raise ValueError(f"models.{model}.overflow_to: names {model!r} itself")
        for model in self.budgets.models:
            if self.endpoints and model not in served:
                raise ValueError(
                    f"budgets.models.{model}: no endpoint serves {model!r}"
                    " (budgets name canonical models)"
                )
        return self

    def canonical(self, model: str) -> str:
        """The canonical name of a model or alias (unknown names unchanged)."""
        for name, spec in self.models.items():
            if model in spec.aliases:
                return name
        return model

    def model_kind(self, model: str) -> str:
        """``chat`` or ``embedding``: what a canonical model does (``chat`` if unknown)."""
        for endpoint in self.endpoints:
            entry = endpoint.models.get(model)
            if entry is not None:
                return entry.kind
        return "chat"

    def served_models(self) -> list[str]:
        """Every canonical model some endpoint serves."""
        return sorted({m for e in self.endpoints for m in e.models})


class _TomlSource(TomlConfigSettingsSource):
    """The TOML file, its ``endpoints`` list keyed by index.

    pydantic-settings merges sources dict into dict; a list is replaced whole.
    Keyed by index, ``LLMQ_ENDPOINTS__0__MAX_CONCURRENCY=8`` overrides one
    field of the first endpoint and keeps the rest of the file's list.
    """

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        endpoints = data.get("endpoints")
        if isinstance(endpoints, list):
            data = {**data, "endpoints": {str(i): e for i, e in enumerate(endpoints)}}
        return data


# pydantic-settings reads the TOML path at class level; this holder keeps
# ``load_settings`` reentrant without subclassing per call.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load and validate the configuration, reading endpoint keys from the environment.

    ``path`` defaults to ``$LLMQ_CONFIG``; with neither, only ``LLMQ_*``
    variables and defaults apply. Raises :class:`ConfigError`.
    """
    chosen = path if path is not None else os.environ.get("LLMQ_CONFIG")
    file = Path(chosen) if chosen else None
    if file is not None and not file.is_file():
        raise ConfigError(f"config error: file {file} does not exist")
    _CONFIG_FILE["path"] = file
    where = f" (in {file})" if file else ""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            loc = ".".join(str(p) for p in err["loc"])
            # Cross-field checks (loc empty) put the field's path in the message.
            lines.append(
                f"config error: {loc}: {msg}{where}" if loc else f"config error: {msg}{where}"
            )
        raise ConfigError("\n".join(lines)) from None
    except ValueError as exc:  # TOML syntax errors arrive as ValueError subclasses
        raise ConfigError(f"config error: {exc}{where}") from None
    except OSError as exc:  # unreadable file
        raise ConfigError(f"config error: cannot read {file}: {exc.strerror or exc}") from None
    finally:
        _CONFIG_FILE["path"] = None
    return _with_keys(settings, where)


def _with_keys(settings: Settings, where: str) -> Settings:
    endpoints = []
    for i, endpoint in enumerate(settings.endpoints):
        for field, env_field in _ENDPOINT_SECRETS:
            if getattr(endpoint, field) not in (None, {}):
                raise ConfigError(
                    f"config error: endpoints.{i}.{field}: keys never go in the config;"
                    f" name an environment variable in {env_field}{where}"
                )
        at = f"endpoints.{i}"
        values = {
            name: _env_value(env, f"{at}.secret_headers.{name}", where)
            for name, env in endpoint.secret_headers.items()
        }
        for name, value in values.items():
            if _CONTROL.search(value.get_secret_value()):
                raise ConfigError(
                    f"config error: {at}.secret_headers.{name}: the value of"
                    f" {endpoint.secret_headers[name]} holds CR, LF or control characters{where}"
                )
        update = {
            "api_key": _secret_env(endpoint.api_key_env, f"{at}.api_key_env", where),
            "azure_ad_token": _secret_env(
                endpoint.azure_ad_token_env, f"{at}.azure_ad_token_env", where
            ),
            "secret_header_values": values,
        }
        endpoints.append(endpoint.model_copy(update=update))
    gateway = settings.gateway
    if gateway.api_keys:
        raise ConfigError(
            f"config error: gateway.api_keys: keys never go in the config;"
            f" name an environment variable in api_keys_env{where}"
        )
    if gateway.tenant_keys:
        raise ConfigError(
            f"config error: gateway.tenant_keys: keys never go in the config;"
            f" map each tenant to an environment variable in gateway.tenants{where}"
        )
    if gateway.api_keys_env:
        gateway = gateway.model_copy(update={"api_keys": _keys_in(gateway.api_keys_env)})
    # A variable that is unset leaves its tenant without keys; the gateway refuses
    # to start then (workers read the same file and never need the keys).
    tenant_keys = {t: _keys_in(env) for t, env in gateway.tenants.items()}
    gateway = gateway.model_copy(update={"tenant_keys": tenant_keys})
    return settings.model_copy(update={"endpoints": endpoints, "gateway": gateway})


_ENDPOINT_SECRETS = (
    ("api_key", "api_key_env"),
    ("azure_ad_token", "azure_ad_token_env"),
    ("secret_header_values", "secret_headers"),
)
"""An endpoint's secrets, each filled from the environment variable its twin names."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _secret_env(env: str | None, field: str, where: str) -> SecretStr | None:
    """The value of environment variable ``env`` (None when no variable is named)."""
    return None if env is None else _env_value(env, field, where)


def _env_value(env: str, field: str, where: str) -> SecretStr:
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"config error: {field}: environment variable {env} is not set{where}")
    return SecretStr(value)


def _keys_in(env: str) -> tuple[SecretStr, ...]:
    raw = os.environ.get(env, "")
    return tuple(SecretStr(k.strip()) for k in raw.split(",") if k.strip())
