"""What containers-run records: safe for any image path, rerunnable by anyone.

- an image stored at a path with spaces, ``$(...)``, ``;``, backticks and double quotes runs
  through a real ``datalad containers-run`` and nothing in the path is executed by the shell;
  a path the call format cannot carry (a single quote, a brace) is refused at import;
- the recorded command names the console script and relative paths, never an interpreter, so a
  second user with another install (a venv at another path, the author's install hidden)
  clones the dataset and ``datalad rerun``\\ s the record with identical output;
- ``containers-run`` called by absolute path from an unactivated venv finds the runner;
- datasets made by 0.1 (``{python} -m datalad_udocker.runtime_cli``) still run;
- a run commit is titled with the user's command (its first 40 characters, as ``datalad run
  CMD`` titles it), not the call format, from the CLI and from ``datalad.api`` (also a rerun
  by the second user), while the record keeps the whole command; ``-m`` still wins.
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


def title(cmd):
    """The title ``datalad run CMD`` gives a run commit of ``cmd``."""
    return "[DATALAD RUNCMD] " + cmd[:40] + ("..." if len(cmd) > 40 else "")


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
        # and the record reruns, also by absolute path from the unactivated venv when
        # DataLad is told to load the extension (`datalad rerun` is a core command)
        (ds / "out.txt").unlink()
        run(["git", "checkout", "out.txt"], cwd=ds)
        res = nonroot.run([str(VENV / "bin" / "datalad"), "-c",
                           "datalad.extensions.load=udocker", "rerun"],
                          cwd=ds, env={**env, "PATH": SYSTEM_PATH})
        assert "to-stdout" in res.stdout
        assert (ds / "out.txt").read_text() == "in-container\n"
        assert not marker.exists()
        assert run(["git", "status", "--porcelain"], cwd=ds).stdout == ""
    finally:
        if marker.exists():
            marker.unlink()


def second_install(nonroot, root: Path) -> Path:
    """A venv of the user at another path: its own interpreter and console scripts.

    Made with /usr/bin/python3 (no pip, offline); the packages come from the repository's
    venv and checkout through a ``.pth`` file, the scripts are the repository venv's with
    their interpreter line pointing at the new venv.
    """
    venv = root / "other-venv"
    nonroot.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)])
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    pth = site / "_datalad_udocker_test.pth"
    pth.write_text(f"{REPO_ROOT}\n{sysconfig.get_path('purelib')}\n")
    nonroot.chown(pth)
    for script in ("datalad", "datalad-udocker-run", "git-annex-remote-udocker"):
        text = (VENV / "bin" / script).read_text().split("\n", 1)[1]
        dest = venv / "bin" / script
        dest.write_text(f"#!{venv / 'bin' / 'python3'}\n{text}")
        dest.chmod(0o755)
        nonroot.chown(dest)
    return venv


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the author is root, the "
                    "second user gets the author's install hidden in a mount namespace")
def test_rerun_by_another_user_with_another_install(nonroot, registry, base):
    """root records a containers-run with its install; udtest reruns it with its own."""
    author_env = {**os.environ, "DATALAD_UDOCKER_DIR": str(base / "root-udocker"),
                  "PATH": f"{VENV / 'bin'}:{SYSTEM_PATH}"}

    def author(cmd, cwd):
        return subprocess.run(cmd, cwd=cwd, env=author_env, check=True, text=True,
                              capture_output=True)

    origin = base / "origin"
    author(["datalad", "create", "-c", "text2git", str(origin)], base)
    author(["datalad", "udocker-import", "-n", "single", f"{registry.host}/test/single:1"],
           origin)
    command = "sh -c 'echo hello-$(uname -s) > out.txt; echo to-stdout'"
    author(["datalad", "containers-run", "-n", "single", "-o", "out.txt", command], origin)
    record, first_line = last_record(lambda c, cwd: author(c, cwd), origin)
    assert first_line == title(command)
    assert record["cmd"].endswith("' " + command)
    assert str(VENV) not in record["cmd"] and "python" not in record["cmd"]
    assert record["cmd"].startswith("datalad-udocker-run ")
    expected = (origin / "out.txt").read_text()
    assert expected == "hello-Linux\n"

    venv = second_install(nonroot, base)
    env = {"PATH": f"{venv / 'bin'}:{SYSTEM_PATH}",
           "DATALAD_UDOCKER_DIR": str(base / "user-udocker")}
    # published, as it were: git refuses to clone a repository of another user
    subprocess.run(["chown", "-R", f"{nonroot.uid}:{nonroot.gid}", str(origin)], check=True)
    nonroot.run(["datalad", "clone", str(origin), "clone"], cwd=base, env=env)
    clone = base / "clone"
    # the author's install is not there for the second user ("another machine")
    user_cmd = nonroot.command(["datalad", "rerun"])
    hide = f"mount -t tmpfs none {VENV / 'bin'} && exec \"$@\""
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", hide,
                          "sh", *user_cmd], cwd=clone, env=nonroot.env(env),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "to-stdout" in res.stdout
    assert (clone / "out.txt").read_text() == expected
    assert nonroot.run(["git", "status", "--porcelain"], cwd=clone, env=env).stdout == ""
    # a rerun that commits (the output was removed) keeps the user's command as the title
    nonroot.run(["git", "rm", "-q", "out.txt"], cwd=clone, env=env)
    nonroot.run(["git", "commit", "-q", "-m", "drop out.txt"], cwd=clone, env=env)
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh",
                          *nonroot.command(["datalad", "rerun", "HEAD~1"])], cwd=clone,
                         env=nonroot.env(env), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (clone / "out.txt").read_text() == expected
    rerun_record, first_line = last_record(lambda c, cwd: nonroot.run(c, cwd=cwd, env=env),
                                           clone)
    assert first_line == title(command)
    assert rerun_record["cmd"] == record["cmd"]


def single_image_dataset(nonroot, registry, base):
    """``(run, ds)``: a dataset in ``base`` holding test/single:1 as ``single``, and a
    runner of commands as the user with the udocker dir in ``base``."""
    env = {"DATALAD_UDOCKER_DIR": str(base / "udocker")}

    def run(cmd, cwd):
        return nonroot.run(cmd, cwd=cwd, env=env)

    ds = base / "ds"
    run(["datalad", "create", "-c", "text2git", str(ds)], base)
    run(["datalad", "udocker-import", "-n", "single", f"{registry.host}/test/single:1"], ds)
    return run, ds


def test_datasets_of_0_1_still_run(nonroot, registry, base):
    """The 0.1 call format ({python} -m datalad_udocker.runtime_cli) runs and reruns."""
    run, ds = single_image_dataset(nonroot, registry, base)
    run(["git", "config", "-f", ".datalad/config", "datalad.containers.single.cmdexec",
         CMDEXEC_0_1], ds)
    run(["datalad", "save", "-m", "as made by 0.1"], ds)
    run(["datalad", "containers-run", "-n", "single", "-o", "old.txt",
         "sh -c 'echo old-format > old.txt'"], ds)
    record, first_line = last_record(run, ds)
    assert "datalad_udocker.runtime_cli" in record["cmd"]
    assert first_line == title("sh -c 'echo old-format > old.txt'")
    assert (ds / "old.txt").read_text() == "old-format\n"
    run(["datalad", "rerun"], ds)
    assert (ds / "old.txt").read_text() == "old-format\n"
    assert run(["git", "status", "--porcelain"], ds).stdout == ""


API_RUN = """
import sys
ds, first, cmd, message = sys.argv[1:5]
if first == "datalad_container":    # imported before our extension loads
    import datalad_container.containers_run  # noqa: F401
import datalad.api as dl
if message:
    dl.containers_run(cmd, container_name="single", dataset=ds, message=message,
                      result_renderer="disabled")
else:
    dl.Dataset(ds).containers_run(cmd, container_name="single", result_renderer="disabled")
"""


def test_run_title_is_the_users_command(nonroot, registry, base):
    """CLI and datalad.api (as in a notebook): the user's command titles the commit, the
    record keeps the call format; an explicit message wins over both."""
    run, ds = single_image_dataset(nonroot, registry, base)
    long_cmd = "sh -c 'echo a long command, longer than forty characters > cli.txt'"
    run(["datalad", "containers-run", "-n", "single", long_cmd], ds)
    record, first_line = last_record(run, ds)
    assert first_line == title(long_cmd) and first_line.endswith("...")
    assert record["cmd"].startswith("datalad-udocker-run ") and record["cmd"].endswith(long_cmd)
    run(["datalad", "containers-run", "-n", "single", "-m", "explained",
         "sh -c 'echo m > m.txt'"], ds)
    assert last_record(run, ds)[1] == "[DATALAD RUNCMD] explained"
    # datalad.api, datalad-container's module imported after and before our extension loads
    for first, message in (("datalad.api", ""), ("datalad_container", ""),
                           ("datalad.api", "my own message")):
        api_cmd = f"sh -c 'echo {first} > api-{len(message)}-{first}.txt'"
        run([str(VENV / "bin" / "python"), "-c", API_RUN, str(ds), first, api_cmd, message],
            ds)
        assert (ds / f"api-{len(message)}-{first}.txt").read_text() == first + "\n"
        assert last_record(run, ds)[1] == (
            "[DATALAD RUNCMD] " + message if message else title(api_cmd))
    # a plain `datalad run` is untouched, even of our runner's command line
    plain = "datalad-udocker-run -d '.' '.datalad/environments/single/image' sh -c 'echo p > p'"
    run(["datalad", "run", plain], ds)
    assert last_record(run, ds)[1] == title(plain)
