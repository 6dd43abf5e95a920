"""The routers the routing benchmark compares, behind one interface.

* ``llmq``: jobs published with :class:`LlmqClient` to a real ``llmq worker``
  process, replies collected from the broker (the worker is started by
  ``bench/routing.py``).
* ``random``, ``round_robin``, ``latency_min``: in-process, calling the fleet
  directly with aiohttp; up to 3 attempts per job, each on an endpoint not yet
  tried, each bounded by what is left of the job's deadline.
* ``litellm_latency``, ``litellm_shuffle``: LiteLLM's Router in-process with
  ``routing_strategy="latency-based-routing"`` / ``"simple-shuffle"``.

The in-process routers have no broker in their path, which favours them.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from bench.routing_stream import Job

MODEL = "gpt-4.1-mini"
API_KEY = "sk-fleet-routing"  # the fake key in bench/scenarios/routing_*.toml
MAX_ATTEMPTS = 3
LLMQ = "llmq"
DIRECT = ("random", "round_robin", "latency_min")
LITELLM = ("litellm_latency", "litellm_shuffle")
ROUTERS = (LLMQ, *DIRECT, *LITELLM)


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    endpoint: str | None = None
    attempts: int | None = None
    """Upstream attempts the router reports (None when it does not say)."""
    error: str | None = None
    upstream_ms: float | None = None
    """llmq only: the winning attempt's upstream time, as the worker measured it."""


class Serving(Protocol):
    async def serve(self, job: Job, deadline: float) -> Outcome:
        """Serve ``job`` before ``deadline`` (``time.monotonic()`` seconds)."""
        ...

    async def aclose(self) -> None: ...


# --- in-process baselines ------------------------------------------------------------


class _Pick(Protocol):
    def pick(self, untried: list[str]) -> str: ...
    def observe(self, endpoint: str, latency_s: float) -> None: ...


class RandomPick:
    """Uniform over the endpoints not yet tried for this job."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, untried: list[str]) -> str:
        return self._rng.choice(untried)

    def observe(self, endpoint: str, latency_s: float) -> None:
        pass


class RoundRobinPick:
    """Each endpoint in turn (skipping those this job already tried)."""

    def __init__(self, endpoints: list[str]) -> None:
        self._order = endpoints
        self._next = 0

    def pick(self, untried: list[str]) -> str:
        for _ in range(len(self._order)):
            name = self._order[self._next % len(self._order)]
            self._next += 1
            if name in untried:
                return name
        return untried[0]

    def observe(self, endpoint: str, latency_s: float) -> None:
        pass


class LatencyMinPick:
    """The seed-style router: "sort by weighted average latency and take the minimum".

    EWMA (weight ``alpha`` on the newest) of each endpoint's successful
    latencies; an endpoint without a sample counts as 0 so every endpoint is
    tried; failures do not enter the average (retries move the job on).
    """

    def __init__(self, endpoints: list[str], rng: random.Random, alpha: float = 0.2) -> None:
        self._avg: dict[str, float] = dict.fromkeys(endpoints, 0.0)
        self._alpha = alpha
        self._rng = rng

    def pick(self, untried: list[str]) -> str:
        best = min(self._avg[n] for n in untried)
        return self._rng.choice([n for n in untried if self._avg[n] == best])

    def observe(self, endpoint: str, latency_s: float) -> None:
        old = self._avg[endpoint]
        self._avg[endpoint] = latency_s if old == 0.0 else old + self._alpha * (latency_s - old)


class Direct:
    """A baseline router calling the fleet itself: pick, POST, retry elsewhere on failure."""

    def __init__(self, urls: dict[str, str], policy: _Pick) -> None:
        self._urls = {name: f"{url}/chat/completions" for name, url in urls.items()}
        self._policy = policy
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )

    async def serve(self, job: Job, deadline: float) -> Outcome:
        body = orjson.dumps(job.body(MODEL))
        untried = list(self._urls)
        error = "no attempt"
        attempts = 0
        while untried and attempts < MAX_ATTEMPTS:
            left = deadline - time.monotonic()
            if left <= 0:
                error = "deadline"
                break
            name = self._policy.pick(untried)
            untried.remove(name)
            attempts += 1
            started = time.monotonic()
            try:
                async with self._session.post(
                    self._urls[name], data=body, timeout=aiohttp.ClientTimeout(total=left)
                ) as response:
                    raw = await response.read()
                    if response.status == 200:
                        answer = orjson.loads(raw)
                        if answer.get("choices"):
                            self._policy.observe(name, time.monotonic() - started)
                            return Outcome(True, name, attempts)
                    error = f"http {response.status}"
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                error = type(exc).__name__
        return Outcome(False, None, attempts, error)

    async def aclose(self) -> None:
        await self._session.close()


def direct_router(name: str, urls: dict[str, str], seed: int) -> Direct:
    rng = random.Random(f"{name}:{seed}")
    endpoints = list(urls)
    policy: _Pick
    if name == "random":
        policy = RandomPick(rng)
    elif name == "round_robin":
        policy = RoundRobinPick(endpoints)
    elif name == "latency_min":
        policy = LatencyMinPick(endpoints, rng)
    else:
        raise ValueError(name)
    return Direct(urls, policy)


# --- LiteLLM ---------------------------------------------------------------------------


def import_litellm() -> Any:
    """Import LiteLLM with its cost map read locally: nothing may leave the machine."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm

    litellm.suppress_debug_info = True
    if hasattr(litellm, "telemetry"):
        litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


class LiteLLMRouter:
    """LiteLLM's Router as its docs set it up: one deployment per endpoint, retries on.

    ``openai/<model>`` deployments with ``api_base`` and ``api_key``;
    ``num_retries=2`` (3 attempts, as the other routers); ``timeout`` = the SLA
    (LiteLLM has no end-to-end deadline, its timeout is per attempt);
    ``enable_pre_call_checks=True`` as the latency-based example in
    docs/my-website/docs/routing.md has it. Cooldowns keep their defaults.
    """

    def __init__(self, strategy: str, urls: dict[str, str], sla_s: float) -> None:
        litellm = import_litellm()
        model_list = [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": url, "api_key": API_KEY},
                "model_info": {"id": name},
            }
            for name, url in urls.items()
        ]
        self.router = litellm.Router(
            model_list=model_list,
            routing_strategy=strategy,
            num_retries=MAX_ATTEMPTS - 1,
            timeout=sla_s,
            enable_pre_call_checks=True,
        )

    async def serve(self, job: Job, deadline: float) -> Outcome:
        body = job.body(MODEL)
        try:
            response = await self.router.acompletion(
                model=MODEL, messages=body["messages"], max_tokens=job.max_tokens
            )
        except Exception as exc:  # LiteLLM maps every failure to its own exception types
            return Outcome(False, None, None, type(exc).__name__)
        hidden = getattr(response, "_hidden_params", {}) or {}
        retries = (hidden.get("additional_headers") or {}).get("x-litellm-attempted-retries")
        attempts = int(retries) + 1 if retries is not None else None
        return Outcome(True, hidden.get("model_id"), attempts)

    async def aclose(self) -> None:
        pass


async def warm_litellm() -> None:
    """One call through a throw-away Router against a throw-away endpoint.

    LiteLLM's first call in a process pays for lazy imports and client set-up
    (~1 s here); that is not routing, so it is paid outside the measured runs
    and outside the benchmark's fleet (whose random draws it would shift).
    """
    from workers.fleet import Fleet, Scenario

    scenario = Scenario.model_validate(
        {"endpoints": [{"name": "warm", "models": [MODEL], "output_tokens": 8}]}
    )
    async with Fleet(scenario, host="127.0.0.1") as fleet:
        warm = LiteLLMRouter("simple-shuffle", {"warm": fleet.url("warm")}, 5.0)
        await warm.router.acompletion(
            model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=8
        )


# --- llmq ----------------------------------------------------------------------------


class LlmqRouter:
    """Jobs go through the broker to a real ``llmq worker``; replies come back on a queue."""

    def __init__(self, client: Any, sla_ms: int, grace_s: float) -> None:
        self._client = client
        self._sla_ms = sla_ms
        self._grace_s = grace_s

    async def serve(self, job: Job, deadline: float) -> Outcome:
        from producers.errors import LlmqError

        try:
            reply = await self._client.call(
                job.body(MODEL),
                sla_ms=self._sla_ms,
                timeout_s=self._sla_ms / 1000 + self._grace_s,
            )
        except LlmqError as exc:
            return Outcome(False, None, None, type(exc).__name__)
        routing = reply.get("routing") or {}
        if reply.get("status") != "ok":
            code = (reply.get("error") or {}).get("code", "error")
            return Outcome(False, routing.get("endpoint"), routing.get("attempts"), code)
        return Outcome(
            True, routing.get("endpoint"), routing.get("attempts"), None, routing.get("upstream_ms")
        )

    async def aclose(self) -> None:
        pass


def make_router(name: str, urls: dict[str, str], seed: int, sla_s: float) -> Serving:
    """An in-process router (``llmq`` is built by the caller around its worker)."""
    if name in DIRECT:
        return direct_router(name, urls, seed)
    if name == "litellm_latency":
        return LiteLLMRouter("latency-based-routing", urls, sla_s)
    if name == "litellm_shuffle":
        return LiteLLMRouter("simple-shuffle", urls, sla_s)
    raise ValueError(f"unknown router {name!r}")


Clock = Callable[[], float]
