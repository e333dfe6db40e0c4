"""Our commands work from a venv that is not activated (called by absolute path).

``datalad clone`` run as ``~/venv/bin/datalad`` with the venv's bin not on PATH cannot
auto-enable the ``udocker-registry`` special remote (git-annex does not find
``git-annex-remote-udocker``).  The clone's layers are then in no remote it can use.  As the
non-root user, with PATH lacking the venv, and from a published dataset whose layers are
only in the registry (a bare git repository without annexed content):

- ``containers-run`` by absolute path enables the remote, gets the layers from the registry
  and runs (its runner, ``datalad-udocker-run``, is the one that gets them);
- ``udocker-export`` by absolute path does the same in another fresh clone;
- so does the runner itself, ``datalad-udocker-run``, called by absolute path;
- ``udocker-import`` by absolute path imports into such a clone (enabling the remote to
  register the new layers' URLs), and ``udocker-containers`` lists;
- a plain ``datalad get`` (DataLad core: no code of ours runs) says "not available" until
  ``git annex enableremote udocker-registry`` is run with the venv's bin on PATH, as
  docs/hpc.rst says.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from fixtures.users import SYSTEM_PATH
from fixtures.util import REPO_ROOT

pytestmark = pytest.mark.timeout(300)

VENV_BIN = REPO_ROOT / ".venv" / "bin"
DATALAD = str(VENV_BIN / "datalad")
IMAGE = Path(".datalad/environments/single/image")
REMOTE = "udocker-registry"


@pytest.fixture(scope="module")
def published(nonroot, registry):
    """A bare git repository of a dataset with an imported image, no annexed content."""
    base = nonroot.make_tempdir("udtest-unactivated-")
    origin = base / "origin"
    nonroot.run(["datalad", "create", "-c", "text2git", str(origin)])
    nonroot.run(["datalad", "udocker-import", "-n", "single",
                 f"{registry.host}/test/single:1"], cwd=origin)
    bare = base / "published.git"
    nonroot.run(["git", "clone", "-q", "--bare", str(origin), str(bare)])
    nonroot.run(["git", "-C", str(bare), "fetch", "-q", str(origin), "git-annex:git-annex"])
    nonroot.run(["git", "-C", str(bare), "remote", "remove", "origin"])
    # the layers can only come from the registry: forget the origin's copies
    shutil.rmtree(origin)
    yield base, bare, registry
    shutil.rmtree(base, ignore_errors=True)


def unactivated(nonroot, base):
    """Run as the user with the venv's bin not on PATH, a fresh udocker directory."""
    udocker_dir = nonroot.make_tempdir("udtest-unactivated-udocker-")
    env = {"PATH": SYSTEM_PATH, "DATALAD_UDOCKER_DIR": str(udocker_dir)}

    def run(cmd, cwd=base, check=True):
        return nonroot.run(cmd, cwd=cwd, env=env, check=check)
    return run


def fresh_clone(run, bare, dest):
    """``datalad clone`` by absolute path; the remote is known but not enabled."""
    run([DATALAD, "clone", str(bare), str(dest)])
    assert REMOTE not in run(["git", "remote"], cwd=dest).stdout.split()
    assert REMOTE in run(["git", "cat-file", "-p", "git-annex:remote.log"],
                         cwd=dest).stdout
    return dest


def blob_gets(registry, digest):
    """How many times the registry served the blob ``digest`` (its access log)."""
    return sum(f'"GET /v2/test/single/blobs/{digest} ' in line and '" 200 ' in line
               for line in registry.log.read_text().splitlines())


def assert_layers_from_registry(run, clone, registry, served_before):
    """Every layer is present in the clone, and the registry served it again."""
    # no other remote to get them from: origin is a bare repository without content
    assert run(["git", "remote"], cwd=clone).stdout.split() == ["origin", REMOTE]
    for layer in registry.images["test/single:1"].layers:
        blob = clone / IMAGE / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
        assert blob.exists(), blob
        assert blob_gets(registry, layer.digest) > served_before[layer.digest]


def served(registry):
    return {layer.digest: blob_gets(registry, layer.digest)
            for layer in registry.images["test/single:1"].layers}


def test_containers_run_enables_the_registry_remote(nonroot, published):
    base, bare, registry = published
    run = unactivated(nonroot, base)
    clone = fresh_clone(run, bare, base / "run-clone")
    before = served(registry)
    res = run([DATALAD, "containers-run", "-n", "single", "-o", "out.txt",
               "sh -c 'echo from-container > out.txt'"], cwd=clone)
    assert (clone / "out.txt").read_text() == "from-container\n", res.stdout
    assert_layers_from_registry(run, clone, registry, before)


def test_udocker_export_enables_the_registry_remote(nonroot, published):
    base, bare, registry = published
    run = unactivated(nonroot, base)
    clone = fresh_clone(run, bare, base / "export-clone")
    before = served(registry)
    out = base / "single.tar"
    run([DATALAD, "udocker-export", "-o", str(out), "single"], cwd=clone)
    with tarfile.open(out) as tar:
        assert "manifest.json" in tar.getnames()
    assert_layers_from_registry(run, clone, registry, before)


def test_runner_by_absolute_path_enables_the_registry_remote(nonroot, published):
    base, bare, registry = published
    run = unactivated(nonroot, base)
    clone = fresh_clone(run, bare, base / "runner-clone")
    before = served(registry)
    res = run([str(VENV_BIN / "datalad-udocker-run"), "-d", ".", str(IMAGE),
               "sh", "-c", "echo from-runner"], cwd=clone)
    assert res.stdout == "from-runner\n", res.stderr
    assert_layers_from_registry(run, clone, registry, before)


def test_plain_datalad_get_after_enableremote(nonroot, published):
    """What docs/hpc.rst tells a user whose `datalad get` says "not available"."""
    base, bare, registry = published
    run = unactivated(nonroot, base)
    clone = fresh_clone(run, bare, base / "get-clone")
    before = served(registry)
    res = run([DATALAD, "get", str(IMAGE)], cwd=clone, check=False)
    assert res.returncode != 0 and "not available" in res.stdout + res.stderr
    run(["sh", "-c", f"PATH={VENV_BIN}:$PATH git annex enableremote {REMOTE}"], cwd=clone)
    # git-annex runs git-annex-remote-udocker for every get: the venv's bin on PATH
    res = run([DATALAD, "get", str(IMAGE)], cwd=clone, check=False)
    assert res.returncode != 0 and "git-annex-remote-udocker" in res.stdout + res.stderr
    run(["sh", "-c", f"PATH={VENV_BIN}:$PATH datalad get {IMAGE}"], cwd=clone)
    assert_layers_from_registry(run, clone, registry, before)


def test_clone_loading_the_extension_enables_the_registry_remote(nonroot, published):
    """docs/hpc.rst: with datalad.extensions.load=udocker in the user's git configuration,
    ``datalad clone`` by absolute path enables the remote at once, and ``get`` works."""
    base, bare, registry = published
    run = unactivated(nonroot, base)
    gitconfig = base / "gitconfig-extensions"
    gitconfig.write_text((nonroot.home / ".gitconfig").read_text())
    nonroot.chown(gitconfig)
    env = {"PATH": SYSTEM_PATH, "GIT_CONFIG_GLOBAL": str(gitconfig)}
    nonroot.run(["git", "config", "--global", "--add", "datalad.extensions.load", "udocker"],
                env=env)
    clone = base / "ext-clone"
    before = served(registry)
    nonroot.run([DATALAD, "clone", str(bare), str(clone)], cwd=base, env=env)
    assert REMOTE in run(["git", "remote"], cwd=clone).stdout.split()
    nonroot.run([DATALAD, "get", str(IMAGE)], cwd=clone, env=env)
    assert_layers_from_registry(run, clone, registry, before)


def test_import_and_listing_by_absolute_path(nonroot, published):
    """udocker-import into a clone whose registry remote is not enabled, and
    udocker-containers, both by absolute path from the unactivated venv."""
    base, bare, registry = published
    run = unactivated(nonroot, base)
    clone = fresh_clone(run, bare, base / "import-clone")
    run([DATALAD, "udocker-import", "-n", "other", f"{registry.host}/test/multi:1"],
        cwd=clone)
    assert REMOTE in run(["git", "remote"], cwd=clone).stdout.split()
    # git-annex knows every new layer's registry URL, claimed by our remote
    whereis = run(["sh", "-c", f"PATH={VENV_BIN}:$PATH git annex whereis --json "
                   ".datalad/environments/other/image/blobs"], cwd=clone).stdout
    for line in whereis.splitlines():
        remotes = {r["description"] for r in json.loads(line)["whereis"]}
        assert "[udocker-registry]" in remotes or "udocker-registry" in remotes, line
    res = run([DATALAD, "udocker-containers"], cwd=clone)
    assert "udocker_containers(notneeded)" in res.stdout, res.stdout
