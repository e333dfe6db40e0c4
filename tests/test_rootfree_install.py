"""A root-free install, as a cluster user does it (docs/hpc.rst, "Install as a user").

Everything runs as the non-root user in a mount namespace where the system's git-annex,
PRoot, runc, patchelf and fakechroot are hidden (``/dev/null`` bound over the programs, an
empty tmpfs over libfakechroot's directory), so nothing from the Debian packages can be used:

- ``pip install '/path/to/clone[annex]'`` into a venv made with ``/usr/bin/python3``, from a
  root-owned, read-only copy of this repository (offline: ``--no-index`` and a wheelhouse
  downloaded once by root); git-annex comes from the PyPI wheel;
- ``datalad udocker-import`` from the test registry, then ``datalad containers-run`` in P1:
  with no tools tarball set it fails with one line naming the setting and installs nothing
  (a dataset's committed ``.datalad/config`` cannot set it); with
  ``datalad.udocker.tools-tarball`` set in the user's git config the first run installs
  udocker's tools from it, saying so, and runs; later runs reuse them.  A second udocker
  directory gets the tarball over HTTP through ``UDOCKER_TARBALL`` and runs R1, then F1
  (udocker picks the tarball's libfakechroot).

``pip wheel`` from the read-only clone and from a git URL (``git daemon`` on 127.0.0.1; the
docs show ``git+https://``) are exercised too.  Fast tests below cover the tarball installer
alone.

The tools tarball is built in udocker's layout from the Debian binaries.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from fixtures.rootfree import BASE_PATH, TOOLS, HiddenToolsUser, _sh
from fixtures.util import free_port, stop_process, wait_until

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def git_url(readonly_clone, shared_dir):
    """The clone as a git repository served by ``git daemon`` on 127.0.0.1: its git URL."""
    repo = shared_dir / "git" / "datalad-udocker"
    shutil.copytree(readonly_clone, repo)
    ident = ["-c", "user.name=Site", "-c", "user.email=site@example.invalid"]
    for cmd in (["init", "-q"], ["add", "-A"], [*ident, "commit", "-q", "-m", "site copy"]):
        _sh("git", *cmd, cwd=repo)
    _sh("chmod", "-R", "u=rwX,go=rX", str(shared_dir / "git"))
    port = free_port()
    log = shared_dir / "git-daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all",
                                 "--listen=127.0.0.1", f"--port={port}",
                                 f"--base-path={shared_dir / 'git'}", str(repo)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _sh("git", "ls-remote", f"git://127.0.0.1:{port}/datalad-udocker"),
                   timeout=30, what="git daemon", proc=proc, log=log)
        yield f"git://127.0.0.1:{port}/datalad-udocker"
    finally:
        stop_process(proc)


def tree(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def error_lines(res):
    return [ln for ln in res.stderr.splitlines() if "datalad-udocker-run: error:" in ln]


def test_rootfree_install_import_and_run(nonroot, registry, readonly_clone, wheelhouse,
                                         git_url, tools_tarball, tarball_server):
    base = nonroot.make_tempdir("udtest-rootfree-")
    try:
        _rootfree_install_import_and_run(nonroot, base, registry, readonly_clone, wheelhouse,
                                         git_url, tools_tarball, tarball_server)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _rootfree_install_import_and_run(nonroot, base, registry, clone, wheelhouse, git_url,
                                     tarball, server):
    user = HiddenToolsUser(nonroot, base)
    venv, ds, udir = base / "venv", base / "ds", base / "home/.cache/datalad-udocker/udocker"

    # the user has none of the tools, and cannot write the clone
    found = user.run("for t in %s; do command -v $t || true; done" % " ".join(TOOLS))
    assert found.stdout == ""
    assert user.run(f"test -w {clone} || echo read-only").stdout == "read-only\n"

    # one pip install, from the read-only clone, writes nothing into it
    before = tree(clone)
    user.run(f"/usr/bin/python3 -m venv {venv}\n"
             f"{venv}/bin/pip install -q --no-index --find-links {wheelhouse} '{clone}[annex]'")
    assert tree(clone) == before
    # nor does building a wheel from it
    user.run(f"{venv}/bin/pip wheel -q --no-deps --no-index --find-links {wheelhouse} "
             f"-w {base}/wheels {clone}")
    assert tree(clone) == before
    assert [p.name for p in (base / "wheels").iterdir()] == [
        "datalad_udocker-0.1.0-py3-none-any.whl"]
    # and from the git URL (pip clones it into a temporary directory)
    user.run(f"{venv}/bin/pip wheel -q --no-deps --no-index --find-links {wheelhouse} "
             f"-w {base}/from-git 'datalad-udocker[annex] @ git+{git_url}'")
    assert [p.name for p in (base / "from-git").iterdir()] == [
        "datalad_udocker-0.1.0-py3-none-any.whl"]
    user.path = f"{venv}/bin:{BASE_PATH}"
    assert user.run("command -v git-annex").stdout == f"{venv}/bin/git-annex\n"
    assert user.run("git annex version --raw").stdout.startswith("10.")

    # import from the registry (git-annex from the wheel)
    user.run(f"datalad create -c text2git {ds}\n"
             f"cd {ds} && datalad udocker-import -n single {registry.host}/test/single:1")

    # no tools and no tarball set: one clear line, nothing fetched or installed, and a
    # dataset cannot set the tarball for its users
    url = f"{server[0]}/{tarball.name}"
    user.run(f"cd {ds} && git config -f .datalad/config datalad.udocker.tools-tarball {url}"
             " && datalad save -m 'tarball from the dataset' .datalad/config")
    res = user.run(f"cd {ds} && datalad containers-run -n single 'echo hi'", check=False)
    assert res.returncode != 0
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    for words in ("needs PRoot", "'proot'", "datalad.udocker.tools-tarball udocker"):
        assert words in lines[0]
    assert server[1] == [] and not (udir / "bin").exists()
    user.run(f"cd {ds} && git reset -q --hard")

    # UDOCKER_TARBALL (udocker's own variable) naming the tests' HTTP server, mode R1
    udir2 = base / "udocker2"
    run_r1 = (f"cd {ds} && datalad-udocker-run --execmode R1 --dataset . "
              f".datalad/environments/single/image sh -c 'echo r1-ran'")
    res = user.run(run_r1, env={"UDOCKER_TARBALL": url, "DATALAD_UDOCKER_DIR": str(udir2)})
    assert res.stdout == "r1-ran\n"
    assert f"installing udocker's tools (PRoot, runc, Fakechroot, patchelf) from {url} " \
        f"into {udir2}" in res.stderr
    assert server[1] == [f"/{tarball.name}"]
    assert sorted(p.name for p in (udir2 / "bin").iterdir()) == [
        "patchelf-x86_64", "proot-x86_64", "runc-x86_64"]
    assert sorted(p.name for p in (udir2 / "lib").iterdir()) == [
        "VERSION", "libfakechroot-x86_64.so"]
    assert [p.name for p in (udir2 / "doc").iterdir()] == ["README"]
    assert not list(base.rglob("evil")) and not Path("/etc/evil").exists()
    # F1 with the tarball's patchelf and libfakechroot (udocker picks the library)
    user.run(f"cd {ds} && datalad udocker-import -n glibc {registry.host}/test/glibc:1")
    res = user.run(f"cd {ds} && datalad-udocker-run --execmode F1 --dataset . "
                   f".datalad/environments/glibc/image sh -c 'echo f1-ran; ls /'",
                   env={"DATALAD_UDOCKER_DIR": str(udir2)})
    assert res.stdout.startswith("f1-ran\n") and "installing" not in res.stderr

    # the user's own git config names the tarball file: the first P1 run installs it
    user.run(f"git config --global datalad.udocker.tools-tarball {tarball}")
    res = user.run(f"cd {ds} && datalad containers-run -n single -o out.txt "
                   "\"sh -c 'uname -s > out.txt; echo p1-ran'\"")
    assert "p1-ran" in res.stdout
    assert f"from {tarball} into {udir}" in res.stderr
    assert (ds / "out.txt").read_text() == "Linux\n"
    assert os.access(udir / "bin" / "proot-x86_64", os.X_OK)
    # later runs use the installed tools and say nothing about them
    res = user.run(f"cd {ds} && datalad rerun")
    assert "installing" not in res.stderr
    assert (ds / "out.txt").read_text() == "Linux\n"
    assert len(server[1]) == 1


# --- the tools tarball on its own (no servers, no second user) ------------------------------
def make_tarball(path: Path, members: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GOOD = {"udocker_dir/bin/proot-x86_64": b"#!/bin/sh\n", "udocker_dir/lib/VERSION": b"1.2.11\n"}


def test_tarball_location_from_the_users_settings(monkeypatch):
    from udocker.config import Config

    from datalad_udocker.run.tools import tarball_locations
    monkeypatch.delenv("UDOCKER_TARBALL", raising=False)
    monkeypatch.delenv("DATALAD_UDOCKER_TOOLS__TARBALL", raising=False)
    assert tarball_locations() == []                  # nothing set: nowhere
    monkeypatch.setenv("UDOCKER_TARBALL", "/site/tools.tgz https://mirror.example/tools.tgz")
    assert tarball_locations() == ["/site/tools.tgz", "https://mirror.example/tools.tgz"]
    # datalad.udocker.tools-tarball wins; "udocker" names udocker's own download locations
    monkeypatch.setenv("DATALAD_UDOCKER_TOOLS__TARBALL", "udocker")
    assert tarball_locations() == Config.conf["tarball"].split()
    assert all(u.startswith("https://") for u in tarball_locations())


@pytest.mark.parametrize("members,words", [
    ({"udocker_dir/bin/proot-x86_64": b"x"}, "not udocker's tools tarball"),
    ({"udocker_dir/bin/proot-x86_64": b"x", "udocker_dir/lib/VERSION": b"1.2.10\n"},
     "tools release '1.2.10', udocker needs 1.2.11 or later"),
    (None, "not a gzip file"),
])
def test_bad_tarball_installs_nothing(tmp_path, members, words):
    from datalad_udocker.errors import ToolMissing
    from datalad_udocker.run.tools import install_tools
    bad = tmp_path / "tools.tgz"
    if members is None:
        bad.write_bytes(b"not a tarball")
    else:
        make_tarball(bad, members)
    udir = tmp_path / "udocker"
    with pytest.raises(ToolMissing) as exc:
        install_tools([str(bad), str(tmp_path / "absent.tgz")], udir)
    message = str(exc.value)
    assert "\n" not in message and words in message
    assert f"{tmp_path}/absent.tgz: [Errno 2] No such file or directory" in message
    assert not (udir / "bin").exists() and not (udir / "lib").exists()


def test_interrupted_install_is_completed(tmp_path):
    from datalad_udocker.run.tools import install_tools
    good = make_tarball(tmp_path / "tools.tgz", GOOD)
    udir = tmp_path / "udocker"
    (udir / "bin").mkdir(parents=True)
    (udir / "bin" / "proot-x86_64").write_bytes(b"#!/bi")        # cut short, no lib/VERSION
    (udir / "bin" / ".proot-x86_64.part").write_bytes(b"#")
    install_tools([str(good)], udir)
    assert (udir / "bin" / "proot-x86_64").read_bytes() == b"#!/bin/sh\n"
    assert os.access(udir / "bin" / "proot-x86_64", os.X_OK)
    assert (udir / "lib" / "VERSION").read_text() == "1.2.11\n"
    assert not list(udir.rglob("*.part"))
    # complete: not installed again (the location is not even looked at)
    install_tools([str(tmp_path / "absent.tgz")], udir)


def test_concurrent_first_runs_install_once(tmp_path, caplog):
    from datalad_udocker.run.tools import install_tools
    members = dict(GOOD, **{f"udocker_dir/lib/big{i}": os.urandom(1 << 20) for i in range(4)})
    good = make_tarball(tmp_path / "tools.tgz", members)
    udir = tmp_path / "udocker"
    errors = []

    def install():
        try:
            install_tools([str(good)], udir)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    with caplog.at_level("WARNING", logger="datalad.udocker.tools"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert [r.getMessage().split(" from ")[0] for r in caplog.records] == [
        "installing udocker's tools (PRoot, runc, Fakechroot, patchelf)"]
    assert (udir / "lib" / "VERSION").read_text() == "1.2.11\n"
