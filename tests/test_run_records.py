"""What containers-run records: safe for any image path, rerunnable by anyone.

- an image stored at a path with spaces, ``$(...)``, ``;``, backticks and double quotes runs
  through a real ``datalad containers-run`` and nothing in the path is executed by the shell;
  a path the call format cannot carry (a single quote, a brace) is refused at import;
- the recorded command names the console script and relative paths, never an interpreter, so a
  second user with another install (a venv at another path, the author's install hidden)
  clones the dataset and ``datalad rerun``\\ s the record with identical output;
- ``containers-run`` called by absolute path from an unactivated venv finds the runner;
- datasets made by 0.1 (``{python} -m datalad_udocker.runtime_cli``) still run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
import uuid
from pathlib import Path

import pytest

from fixtures.users import SYSTEM_PATH
from fixtures.util import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

VENV = REPO_ROOT / ".venv"
CMDEXEC_0_1 = "{python} -m datalad_udocker.runtime_cli --dataset {img_dspath} {img} {cmd}"


def last_record(run, ds):
    """The run record (dict) and the title of the last commit."""
    msg = run(["git", "log", "-1", "--format=%B"], cwd=ds).stdout
    record = re.search(r"=== Do not change lines below ===\n(.*)\n\^\^\^", msg, re.S).group(1)
    return json.loads(record), msg.splitlines()[0]


@pytest.fixture
def base(nonroot):
    path = nonroot.make_tempdir("udtest-records-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_image_path_with_shell_metacharacters(nonroot, registry, base):
    marker = Path("/tmp") / ("pwned-" + uuid.uuid4().hex)
    env = {"DATALAD_UDOCKER_DIR": str(base / "udocker")}

    def run(cmd, cwd=base, check=True, **kw):
        return nonroot.run(cmd, cwd=cwd, env=env, check=check, **kw)

    ds = base / "ds"
    run(["datalad", "create", "-c", "text2git", str(ds)])
    ref = f"{registry.host}/test/single:1"
    # refused: what single quotes cannot carry; one line, nothing stored
    for bad in ("it's/image", "a{inputs}/image"):
        res = run(["datalad", "udocker-import", "-d", str(ds), "-n", "bad", ref, bad],
                  cwd=ds, check=False)
        assert res.returncode != 0
        lines = [ln for ln in (res.stdout + res.stderr).splitlines()
                 if "cannot store an image at" in ln]
        assert len(lines) == 1 and "choose a path without" in lines[0], res.stdout
        assert run(["git", "status", "--porcelain"], cwd=ds).stdout == ""
    # accepted: spaces, $(...), ;, backticks, double quotes, $VAR
    odd = f'my env/$(touch {marker}); `touch {marker}` "q" $HOME/image'
    run(["datalad", "udocker-import", "-d", str(ds), "-n", "odd", ref, odd], cwd=ds)
    assert (ds / odd / "index.json").is_file()
    # containers-run by absolute path, venv not on PATH: the runner is found anyway
    try:
        res = nonroot.run([str(VENV / "bin" / "datalad"), "containers-run", "-n", "odd",
                           "-o", "out.txt",
                           "sh -c 'echo in-container > out.txt; echo to-stdout'"],
                          cwd=ds, env={**env, "PATH": SYSTEM_PATH})
        assert "to-stdout" in res.stdout
        assert (ds / "out.txt").read_text() == "in-container\n"
        assert not marker.exists(), "the image path was executed by the shell"
        record, _ = last_record(run, ds)
        assert "'" + odd + "'" in record["cmd"]
        # and the record reruns
        (ds / "out.txt").unlink()
        run(["git", "checkout", "out.txt"], cwd=ds)
        run(["datalad", "rerun"], cwd=ds)
        assert (ds / "out.txt").read_text() == "in-container\n"
        assert not marker.exists()
        assert run(["git", "status", "--porcelain"], cwd=ds).stdout == ""
    finally:
        if marker.exists():
            marker.unlink()
