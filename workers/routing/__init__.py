"""The pure routing core: which endpoint, how long to wait, whether to retry.

No I/O and no clock or randomness of its own: callers pass ``now``
(monotonic seconds) and ``rand`` (``() -> [0, 1)``). tests/unit/test_architecture.py
keeps it that way. Modules, by concern:

* ``config``: EndpointSpec, Work, RoutingConfig (every tunable and its source)
* ``router``: Router (pick, begin/succeed/fail/cancel, timeouts, hedge delay, status)
* ``endpoint``, ``estimator``, ``health``, ``limits``: one endpoint's state
* ``policy``: LatencyPolicy (default), P2CPolicy, RoundRobinPolicy, RandomPolicy
* ``steps``: next_step / should_hedge — the per-job decisions
* ``budget``, ``backoff``: RetryBudget, full-jitter backoff
* ``disposition``: reply / dead letter / ack for a finished job
"""

from workers.routing.backoff import backoff
from workers.routing.config import EndpointSpec, ModelRules, RoutingConfig, Work
from workers.routing.disposition import Disposition, disposition
from workers.routing.failures import FailureKind
from workers.routing.health import CircuitState
from workers.routing.policy import (
    LatencyPolicy,
    P2CPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
)
from workers.routing.retry_budget import RetryBudget
from workers.routing.router import Router
from workers.routing.steps import (
    GiveUp,
    Progress,
    Step,
    TryNow,
    Wait,
    next_step,
    should_hedge,
)
from workers.routing.values import (
    Attempt,
    Candidate,
    Choice,
    EndpointStatus,
    NoChoice,
    Skip,
)

__all__ = [
    "Attempt",
    "Candidate",
    "Choice",
    "CircuitState",
    "Disposition",
    "EndpointSpec",
    "EndpointStatus",
    "FailureKind",
    "GiveUp",
    "LatencyPolicy",
    "ModelRules",
    "NoChoice",
    "P2CPolicy",
    "Policy",
    "Progress",
    "RandomPolicy",
    "RetryBudget",
    "RoundRobinPolicy",
    "Router",
    "RoutingConfig",
    "Skip",
    "Step",
    "TryNow",
    "Wait",
    "Work",
    "backoff",
    "disposition",
    "next_step",
    "should_hedge",
]
