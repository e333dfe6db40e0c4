"""Shared pytest fixtures: real registries, a fault proxy, dockerd, a non-root user.

All components are real (see tests/fixtures/). Session fixtures:

- ``registry``        plain docker-registry with the standard images (``registry.images``)
- ``basic_registry``  htpasswd (Basic) registry with the standard images
- ``token_registry``  Bearer-token registry (``.issuer`` is the TokenIssuer) with the images
- ``dockerd``         a private Docker Engine (skips with a reason if not root / not installed)
- ``nonroot``         a UserRunner running commands as the non-root user ``udtest``
- ``slurm``           a real single-node Slurm cluster (fails, never skips, if it cannot start)
- ``git_home``        the isolated HOME (with .gitconfig) every test runs with

Function fixtures: ``fault_proxy`` (FaultProxy in front of ``registry``), ``token_issuer``
(the token registry's issuer, knobs restored afterwards), ``make_registry`` (factory for
throw-away registries), ``annex_allow_loopback`` (allows git-annex's own HTTP to 127.0.0.1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures.dockerd import start_dockerd_or_skip  # noqa: E402
from fixtures.proxy import FaultProxy  # noqa: E402
from fixtures.registry import Registry  # noqa: E402
# session fixtures of the root-free install, shared by test_rootfree_install and
# test_hpc_walkthrough
from fixtures.rootfree import (readonly_clone, shared_dir, tarball_server,  # noqa: E402,F401
                               tools_tarball, wheelhouse)
from fixtures.slurm import SlurmCluster, slurm_unavailable_reason  # noqa: E402
from fixtures.users import GITCONFIG, UserRunner  # noqa: E402
from fixtures.util import REPO_ROOT  # noqa: E402

VENV_BIN = REPO_ROOT / ".venv" / "bin"
_saved_env: dict = {}
BLOB_CACHE_OFF = "DATALAD_UDOCKER_BLOB__CACHE"


def pytest_configure(config):
    """Before anything imports datalad: venv bin on PATH, HOME and git config isolated."""
    home = Path(tempfile.mkdtemp(prefix="udocker-test-home-"))
    (home / ".gitconfig").write_text(GITCONFIG)
    for key in ("HOME", "PATH", "GIT_CONFIG_NOSYSTEM", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
                "XDG_DATA_HOME"):
        _saved_env[key] = os.environ.get(key)
    os.environ["HOME"] = str(home)
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    for key in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        os.environ.pop(key, None)
    # tests that count or break registry requests must reach the registry: the blob cache
    # (dataset/blobcache.py) is off here; tests/test_blobcache.py turns it on
    _saved_env[BLOB_CACHE_OFF] = os.environ.get(BLOB_CACHE_OFF)
    os.environ[BLOB_CACHE_OFF] = "false"
    path = os.environ.get("PATH", "").split(os.pathsep)
    if str(VENV_BIN) not in path:
        os.environ["PATH"] = os.pathsep.join([str(VENV_BIN)] + path)
    config._udocker_test_home = home


# Fixtures that start servers, datasets or user processes: a test using any of them is in
# the slow tier.  ``pytest -m "not slow"`` runs the fast tier (pure parts, no servers).
SLOW_FIXTURES = {"registry", "basic_registry", "token_registry", "make_registry", "fault_proxy",
                 "token_issuer", "dockerd", "nonroot", "ds", "slurm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config):
    home = getattr(config, "_udocker_test_home", None)
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def git_home(pytestconfig) -> Path:
    """The isolated HOME of this test session (has a .gitconfig with user.name/email)."""
    return pytestconfig._udocker_test_home


@pytest.fixture
def annex_allow_loopback(git_home):
    """Let git-annex's own HTTP (web remote) use 127.0.0.1 for this test, then forbid it again."""
    subprocess.run(["git", "config", "--global", "annex.security.allowed-ip-addresses", "all"],
                   check=True)
    yield
    subprocess.run(["git", "config", "--global", "--unset", "annex.security.allowed-ip-addresses"],
                   check=False)


def _started(flavour: str, tmp_path_factory, **kw) -> Registry:
    reg = Registry(flavour, workdir=tmp_path_factory.mktemp(f"registry-{flavour}"), **kw).start()
    try:
        reg.push_standard_images()
    except Exception:
        reg.stop()
        raise
    return reg


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Plain (no auth) registry with the standard images; ``registry.images`` describes them."""
    reg = _started("plain", tmp_path_factory)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    """htpasswd registry (``.username``/``.password``) with the standard images."""
    reg = _started("basic", tmp_path_factory)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """Bearer-token registry with the standard images; anonymous pull allowed by default."""
    reg = _started("token", tmp_path_factory)
    yield reg
    reg.stop()


@pytest.fixture
def token_issuer(token_registry):
    """The token registry's issuer with recorded requests cleared; knobs restored afterwards."""
    issuer = token_registry.issuer
    saved = (issuer.anonymous_pull, issuer.expires_in, issuer.strict_expiry, dict(issuer.users))
    issuer.clear()
    yield issuer
    issuer.anonymous_pull, issuer.expires_in, issuer.strict_expiry = saved[:3]
    issuer.users = saved[3]
    issuer.clear()


@pytest.fixture
def make_registry(tmp_path_factory):
    """Factory ``make_registry(flavour='plain', images=True, **Registry kwargs) -> Registry``.

    ``images``: True pushes the whole catalogue, a list pushes only those refs, False none.
    Every registry made is stopped at teardown.
    """
    made = []

    def make(flavour: str = "plain", images=True, **kw) -> Registry:
        reg = Registry(flavour, workdir=tmp_path_factory.mktemp(f"registry-{flavour}"), **kw)
        made.append(reg.start())
        if images:
            reg.push_standard_images(only=None if images is True else list(images))
        return reg

    yield make
    for reg in made:
        reg.stop()


@pytest.fixture
def fault_proxy(registry):
    """A FaultProxy in front of the plain ``registry`` (no rules yet), stopped afterwards."""
    proxy = FaultProxy(registry.host).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def dockerd():
    """A private Docker Engine (``.host``, ``.env``, ``.docker(*args)``)."""
    engine = start_dockerd_or_skip()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def nonroot():
    """Run commands as a non-root user: ``nonroot.run(cmd, cwd=, env=) -> CompletedProcess``."""
    runner = UserRunner()
    yield runner
    shutil.rmtree(runner.home, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm cluster (``.env`` has ``SLURM_CONF``), stopped at the end.

    Fails (never skips) when it cannot start: the CI runs as root with slurm-wlm and munge.
    """
    reason = slurm_unavailable_reason()
    if reason:
        pytest.fail(f"no Slurm cluster: {reason}", pytrace=False)
    cluster = SlurmCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def ds(tmp_path):
    """A fresh DataLad dataset (with annex) in the test's tmp dir."""
    import datalad.api as dl
    return dl.create(tmp_path / "ds", result_renderer="disabled")
