"""Session fixtures: real registries on loopback, started once per test session."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry import RegistryServer, running_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous Distribution registry (the common case: a local or in-cluster mirror)."""
    with running_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry behind htpasswd basic auth."""
    with running_registry(
        tmp_path_factory.mktemp("auth-registry"), username="kitfs", password="s3cret-pw"
    ) as server:
        yield server


@pytest.fixture
def kitops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated $KITOPS_HOME (and Docker config) so no test reads the user's credentials."""
    home = tmp_path / "kitops-home"
    home.mkdir()
    monkeypatch.setenv("KITOPS_HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    return home


def pytest_configure(config: pytest.Config) -> None:
    """Tests that Ctrl-C a `kitfs` child need its SIGINT at the default, as a terminal gives
    it. A shell that starts `pytest &` without job control has it ignored, and children
    (xdist workers, then each `kitfs`) inherit that; a handler of our own is reset at exec."""
    if (signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGINT, signal.default_int_handler)
