"""End to end as a non-root user: import from a real registry, clone, containers-run.

Everything runs as the ``nonroot`` user through DataLad's command line, as a user on a cluster
would: ``datalad udocker-import`` from the local registry, ``datalad clone`` into a second
directory (no layer content), ``datalad containers-run`` (which fetches the layers from the
registry through the special remote) in P1, F1 and R1, ``datalad rerun``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fixtures import images as im
from fixtures.catalogue import multi_layers

pytestmark = pytest.mark.timeout(600)


class User:
    """The non-root user's side of a test: its own udocker dir, datasets and commands."""

    def __init__(self, nonroot):
        self.nonroot = nonroot
        self.base = nonroot.make_tempdir("udtest-e2e-")
        self.udir = self.base / "udocker"
        self.env = {"DATALAD_UDOCKER_DIR": str(self.udir)}

    def run(self, cmd, cwd=None, check=True):
        return self.nonroot.run(cmd, cwd=cwd or self.base, env=self.env, check=check)

    def imported_clone(self, registry, ref, name, dest="clone"):
        """``datalad create`` + ``udocker-import`` REF as NAME, then a clone without content
        at DEST."""
        self.run(["datalad", "create", "-c", "text2git", "origin"])
        self.run(["datalad", "udocker-import", "-d", "origin", "-n", name,
                  f"{registry.host}/{ref}"])
        self.run(["datalad", "clone", "origin", dest])
        clone = self.base / dest
        image = clone / ".datalad" / "environments" / name / "image"
        layers = [p for p in (image / "blobs" / "sha256").iterdir() if p.is_symlink()]
        assert layers and not any(p.exists() for p in layers), "clone must start without layers"
        return clone

    def containers(self):
        cdir = self.udir / "containers"
        return sorted(p.name for p in cdir.iterdir() if not p.is_symlink()) \
            if cdir.is_dir() else []


@pytest.fixture
def user(nonroot):
    user = User(nonroot)
    yield user
    shutil.rmtree(user.base, ignore_errors=True)


@pytest.mark.parametrize("mode,ref,name", [("P1", "test/single:1", "single"),
                                           ("R1", "test/single:1", "single"),
                                           ("F1", "test/glibc:1", "glibc")])
def test_containers_run_in_clone_and_rerun(user, registry, mode, ref, name):
    clone = user.imported_clone(registry, ref, name)
    user.run(["git", "config", "datalad.udocker.execmode", mode], cwd=clone)
    res = user.run(["datalad", "containers-run", "-n", name, "-o", "out.txt",
                    "sh -c 'uname -s > out.txt; echo to-stdout'"], cwd=clone)
    assert "to-stdout" in res.stdout
    for banner in ("STARTING", "executing:", "Popen", "Warning:", "Error:", "Info:"):
        assert banner not in res.stdout + res.stderr
    out = clone / "out.txt"
    assert out.read_text() == "Linux\n"
    st = os.lstat(out)
    assert st.st_uid == user.nonroot.uid
    assert "[DATALAD RUNCMD]" in user.run(["git", "log", "-1", "--format=%B"], cwd=clone).stdout
    assert user.run(["git", "status", "--porcelain"], cwd=clone).stdout == ""
    containers = user.containers()
    assert len(containers) == 1
    # rerun reproduces the output with the same (reused) container
    user.run(["datalad", "rerun"], cwd=clone)
    assert out.read_text() == "Linux\n"
    assert user.containers() == containers
    assert user.run(["git", "status", "--porcelain"], cwd=clone).stdout == ""
    # the command's exit status, exactly: DataLad exits with it and records it
    res = user.run(["datalad", "containers-run", "-n", name,
                    "sh -c 'echo partial > failed.txt; exit 3'"], cwd=clone, check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "run(error)" in res.stdout
    assert run_record((clone / ".git" / "COMMIT_EDITMSG").read_text())["exit"] == 3
    assert (clone / "failed.txt").read_text() == "partial\n"
    (clone / "failed.txt").unlink()
    assert user.run(["git", "status", "--porcelain"], cwd=clone).stdout == ""


@pytest.mark.parametrize("mode", ["P1", "R1", "F1"])
def test_dataset_path_with_colon_and_space(user, registry, mode):
    """udocker's --volume splits at ':' (issue 9 item 6): such a dataset runs all the same,
    bound at its own path (F1 cannot: one clear error)."""
    clone = user.imported_clone(registry, "test/single:1", "single", dest="run: here x")
    (clone / "sub:dir").mkdir()
    user.nonroot.chown(clone / "sub:dir")
    user.run(["git", "config", "datalad.udocker.execmode", mode], cwd=clone)
    res = user.run(["datalad", "containers-run", "-n", "single", "-o", "out.txt",
                    "sh -c 'pwd > ../out.txt; ls ..'"], cwd=clone / "sub:dir", check=False)
    if mode == "F1":
        assert res.returncode != 0
        error = one_line_error(res) if "datalad-udocker-run: error:" in res.stderr else ""
        assert "use execmode P1 or R1" in error, res.stdout + res.stderr
        assert not (clone / "out.txt").exists()
        return
    assert res.returncode == 0, res.stdout + res.stderr
    assert (clone / "out.txt").read_text() == f"{clone}/sub:dir\n"
    assert "sub:dir" in res.stdout
    assert os.lstat(clone / "out.txt").st_uid == user.nonroot.uid
    assert user.run(["git", "status", "--porcelain"], cwd=clone).stdout == ""


def run_record(message):
    """The run record in a ``[DATALAD RUNCMD]`` commit message."""
    return json.loads(message.split("=== Do not change lines below ===\n", 1)[1]
                      .split("\n^^^ Do not change lines above ^^^", 1)[0])


def test_entrypoint_cmd_env_and_cwd(user, registry):
    clone = user.imported_clone(registry, "test/multi:1", "multi")
    (clone / "sub").mkdir()
    user.nonroot.chown(clone / "sub")
    # empty command: Entrypoint + Cmd; cwd = caller's directory inside the dataset
    res = user.run(["datalad", "containers-run", "-n", "multi", ""], cwd=clone / "sub")
    assert f"greeting=hello version=1 cwd={clone}/sub args=default-arg" in res.stdout
    res = user.run(["datalad", "containers-run", "-n", "multi", "a b"], cwd=clone)
    assert f"greeting=hello version=1 cwd={clone} args=a b" in res.stdout


def test_whiteouts_in_imported_image(user, registry):
    clone = user.imported_clone(registry, "test/multi:1", "multi")
    image = clone / ".datalad/environments/multi/image"
    # layers come from the registry on first use (the adapter gets them itself)
    res = user.run(["datalad-udocker-run", "--dataset", str(clone), "--entrypoint", "/bin/sh",
                    str(image), "-c", "cd / && find data opaque app -type f | sort"], cwd=clone)
    expected = sorted(p for p, e in im.flatten([l.spec for l in multi_layers(1)]).items()
                      if p.split("/")[0] in ("data", "opaque", "app")
                      and isinstance(e, (bytes, im.File)))
    assert res.stdout.split() == expected


def one_line_error(res):
    lines = [ln for ln in res.stderr.splitlines() if "datalad-udocker-run: error:" in ln]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_errors_in_containers_run(user, registry):
    clone = user.imported_clone(registry, "test/single:1", "single")
    # unknown execution mode
    user.run(["git", "config", "datalad.udocker.execmode", "Z1"], cwd=clone)
    res = user.run(["datalad", "containers-run", "-n", "single", "true"], cwd=clone, check=False)
    assert res.returncode != 0
    assert "unknown execution mode 'Z1'" in one_line_error(res)
    assert user.containers() == []
    user.run(["git", "config", "--unset", "datalad.udocker.execmode"], cwd=clone)
    # command not found in the container
    res = user.run(["datalad", "containers-run", "-n", "single", "no-such-program"],
                   cwd=clone, check=False)
    assert res.returncode != 0
    assert "command not found in the container: no-such-program" in one_line_error(res)
    assert len(user.containers()) == 1        # the container itself is fine
    user.run(["git", "reset", "--hard", "-q"], cwd=clone)


def test_corrupt_layer_in_clone(user, registry):
    clone = user.imported_clone(registry, "test/single:1", "single")
    image = clone / ".datalad/environments/single/image"
    user.run(["datalad", "get", str(image)], cwd=clone)
    layer = next(p for p in (image / "blobs/sha256").iterdir() if p.is_symlink())
    obj = Path(os.path.realpath(layer))
    user.run(["chmod", "u+w", str(obj.parent), str(obj)])
    data = bytearray(obj.read_bytes())
    data[100] ^= 0xFF
    obj.write_bytes(bytes(data))
    res = user.run(["datalad", "containers-run", "-n", "single", "true"], cwd=clone, check=False)
    assert res.returncode != 0
    assert "corrupt" in one_line_error(res)
    assert user.containers() == []


def test_layers_that_cannot_be_fetched(user, make_registry):
    reg = make_registry(images=["test/single:1"])
    clone = user.imported_clone(reg, "test/single:1", "single")
    user.run(["git", "remote", "remove", "origin"], cwd=clone)   # only the registry is left
    reg.stop()
    res = user.run(["datalad-udocker-run", "--dataset", str(clone),
                    str(clone / ".datalad/environments/single/image"), "true"],
                   cwd=clone, check=False)
    assert res.returncode == 125
    assert "not present and could not be fetched" in one_line_error(res)
    assert user.containers() == []


def test_containers_run_from_python(user, registry):
    """What a notebook does: datalad.api.containers_run, recorded like the CLI."""
    clone = user.imported_clone(registry, "test/single:1", "single")
    code = ("import datalad.api as dl\n"
            f"dl.containers_run(\"sh -c 'echo from-python > py.txt'\", container_name='single',"
            f" outputs=['py.txt'], dataset={str(clone)!r}, result_renderer='disabled')\n")
    user.run(["python", "-c", code], cwd=clone)
    assert (clone / "py.txt").read_text() == "from-python\n"
    assert user.run(["git", "status", "--porcelain"], cwd=clone).stdout == ""
    assert "[DATALAD RUNCMD]" in user.run(["git", "log", "-1", "--format=%B"], cwd=clone).stdout
