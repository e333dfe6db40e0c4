"""The few git and git-annex plumbing calls the store makes, and nothing else.

Every failure is a one-line UdockerError, never a CalledProcessError.

Each call runs ``git annex`` in the dataset with this Python environment's
script directory on PATH, so git-annex finds ``git-annex-remote-udocker``
even when the venv is not activated.
"""
import logging
import os
import subprocess
import sys

from ..errors import UdockerError

lgr = logging.getLogger("datalad.udocker.annex")


def script_env(env=None):
    """os.environ (or ``env``) with our console-script directory on PATH."""
    env = dict(os.environ if env is None else env)
    bindir = os.path.dirname(sys.executable)
    parts = env.get("PATH", "").split(os.pathsep)
    if bindir not in parts:
        env["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p])
    return env


def one_line(text, limit=300):
    """``text`` (a subprocess's stderr, an exception) squeezed onto one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def git(repo_path, *args, input=None):
    """Run ``git ARGS`` in ``repo_path``; return stdout, or raise a one-line UdockerError."""
    proc = subprocess.run(["git"] + list(args), cwd=repo_path, text=True,
                          input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UdockerError("git %s failed: %s" % (args[0], one_line(
            detail[-1] if detail else "exit %d" % proc.returncode)))
    return proc.stdout


def annex(repo_path, *args, batch=None, config=()):
    """Run ``git [-c k=v ...] annex ARGS`` and return its stdout.

    ``batch`` is a list of input lines for ``--batch`` commands.
    """
    cmd = ["git"]
    for item in config:
        cmd += ["-c", item]
    cmd += ["annex"] + list(args)
    if batch is not None:
        cmd.append("--batch")
    lgr.debug("running %s", cmd)
    proc = subprocess.run(
        cmd, cwd=repo_path, env=script_env(), text=True,
        input="".join(line + "\n" for line in batch) if batch is not None else None,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UdockerError("git annex %s failed: %s" % (
            args[0], one_line(detail[-1] if detail else "exit %d" % proc.returncode)))
    return proc.stdout


def set_key_content(repo_path, key, verified_file):
    """Move an already verified file into the annex as the content of ``key``.

    The bytes were hashed while they were downloaded, so git-annex is told
    not to hash them a second time.
    """
    annex(repo_path, "setkey", key, verified_file, config=["annex.verify=false"])


def keys_present(repo_path, keys):
    """The subset of ``keys`` whose content is in the local annex (one call)."""
    keys = list(keys)
    if not keys:
        return set()
    out = annex(repo_path, "contentlocation", batch=keys).split("\n")
    return {k for k, loc in zip(keys, out) if loc.strip()}


def keys_in_tree(repo_path, treeish="HEAD"):
    """Every annex key that a file of ``treeish`` points to (present or not)."""
    out = annex(repo_path, "find", "--branch=" + treeish, "--include=*",
                "--format=${key}\\n")
    return set(out.split())


def drop_key(repo_path, key):
    """Remove ``key``'s content from the local annex (the caller checked
    that nothing committed refers to it)."""
    annex(repo_path, "dropkey", "--force", key)


def remote_uuid(repo_path, name):
    proc = subprocess.run(["git", "config", "remote.%s.annex-uuid" % name],
                          cwd=repo_path, stdout=subprocess.PIPE, text=True)
    return proc.stdout.strip() or None


def ensure_special_remote(repo_path, name, externaltype):
    """Initialise (or enable) our read-only registry remote; return its UUID."""
    uuid = remote_uuid(repo_path, name)
    if uuid:
        return uuid
    if _remote_known(repo_path, name):      # initialised in another clone
        annex(repo_path, "enableremote", name)
    else:
        annex(repo_path, "initremote", name, "type=external",
              "externaltype=" + externaltype, "encryption=none",
              "autoenable=true")
    uuid = remote_uuid(repo_path, name)
    if not uuid:
        raise UdockerError("could not set up the git-annex special remote %s"
                           % name)
    return uuid


def _remote_known(repo_path, name):
    """Is a special remote ``name`` recorded in the git-annex branch?"""
    proc = subprocess.run(["git", "cat-file", "-p", "git-annex:remote.log"],
                          cwd=repo_path, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return any(("name=%s" % name) in line.split()
               for line in proc.stdout.splitlines())
