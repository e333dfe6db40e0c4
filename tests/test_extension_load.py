"""Loading the extension stays cheap (DataLad imports it for every command).

For ``datalad containers-run`` it enables the registry remote a clone could not enable
(tests/test_unactivated_venv.py); when the dataset's git config already has it enabled,
the check reads that file only: no git process starts (``GIT_TRACE`` shows each one) and
nothing more of ours is imported.  The file check is exact for a repository's ``.git``
directory, a ``.git`` file (submodules) and a linked worktree, and never mistakes another
remote for ours; when unsure it says so and git is asked.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from datalad_udocker import config
from datalad_udocker.hooks import _enabled_in_git_config

REMOTE = config.SPECIAL_REMOTE_NAME


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git("init", "-q", cwd=path)
    git("commit", "-q", "--allow-empty", "-m", "start", cwd=path)
    return path


def enable(path: Path, name=REMOTE):
    """What ``git annex enableremote`` leaves in .git/config for our remote."""
    git("config", f"remote.{name}.annex-externaltype", "udocker", cwd=path)
    git("config", f"remote.{name}.annex-uuid", str(uuid.uuid4()), cwd=path)


def test_git_config_check(tmp_path):
    ds = repo(tmp_path / "ds")
    (ds / "sub" / "dir").mkdir(parents=True)
    assert not _enabled_in_git_config(ds)
    enable(ds, REMOTE + "-other")              # another remote: not ours
    git("config", f"remote.{REMOTE}.url", "x", cwd=ds)     # ours, without a uuid
    assert not _enabled_in_git_config(ds)
    enable(ds)
    assert _enabled_in_git_config(ds) and _enabled_in_git_config(ds / "sub" / "dir")
    # a linked worktree reads the common config
    git("worktree", "add", "-q", str(tmp_path / "wt"), cwd=ds)
    assert _enabled_in_git_config(tmp_path / "wt")
    # a submodule: .git is a file naming the git directory
    sub = repo(tmp_path / "subsrc")
    subprocess.run(["git", "-c", "protocol.file.allow=always", "submodule", "add", "-q",
                    str(sub), "inner"], cwd=ds, check=True, capture_output=True)
    assert (ds / "inner" / ".git").is_file()
    assert not _enabled_in_git_config(ds / "inner")
    enable(ds / "inner")
    assert _enabled_in_git_config(ds / "inner")
    git("config", "--unset", f"remote.{REMOTE}.annex-uuid", cwd=ds)
    assert not _enabled_in_git_config(ds) and not _enabled_in_git_config(tmp_path / "wt")
    assert not _enabled_in_git_config(tmp_path)   # no repository at all


LOAD = ("import sys; sys.argv = ['datalad'] + sys.argv[1:]; import datalad_udocker; "
        "print(sorted(m for m in sys.modules if m.startswith('datalad_udocker.')))")


def load_extension(cwd, *argv, trace):
    """Import the package as DataLad does, with ``argv``; (our modules, git commands)."""
    env = dict(os.environ, GIT_TRACE=str(trace))
    out = subprocess.run([sys.executable, "-c", LOAD, *argv], cwd=cwd, env=env,
                         check=True, capture_output=True, text=True).stdout
    gits = [ln for ln in trace.read_text().splitlines() if "trace: built-in" in ln] \
        if trace.exists() else []
    trace.unlink(missing_ok=True)
    return out, gits


def test_containers_run_hook_costs_nothing_when_enabled(tmp_path):
    ds = repo(tmp_path / "ds")
    trace = tmp_path / "git-trace"
    enable(ds)
    modules, gits = load_extension(ds, "containers-run", "-n", "x", "true", trace=trace)
    assert gits == []
    assert "hooks" in modules and "dataset" not in modules, modules
    # -d names the dataset; from elsewhere, the same
    modules, gits = load_extension(tmp_path, "containers-run", "-d", str(ds), "true",
                                   trace=trace)
    assert gits == [] and "dataset" not in modules
    # not enabled here: git is asked (nothing known to enable, so nothing happens)
    git("config", "--unset", f"remote.{REMOTE}.annex-uuid", cwd=ds)
    _, gits = load_extension(ds, "containers-run", "-n", "x", "true", trace=trace)
    assert any("rev-parse --show-toplevel" in ln for ln in gits), gits
    assert "annex-uuid" not in git("config", "--list", cwd=ds)
    # other commands: no check at all
    _, gits = load_extension(ds, "status", trace=trace)
    assert gits == []
