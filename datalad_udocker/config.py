"""Names of every setting this package reads, in one place.

Every ``datalad.udocker.*`` setting comes only from the user's own
configuration: ``git config`` (the repository's ``.git/config``, global,
system), DataLad's overrides and the environment (``DATALAD_UDOCKER_DIR``,
``DATALAD_UDOCKER_INSECURE__REGISTRIES``, ...), never from a dataset's
committed ``.datalad/config``: a dataset cloned from a stranger cannot choose
which registries are spoken to over plain http, where udocker's directory is
(what prune deletes in), or how containers run.  :func:`get` is the one
reader.

``datalad.udocker.insecure-registries``
    Space- or comma-separated ``host[:port]`` list spoken to over plain http.
    Loopback registries (localhost, 127.0.0.0/8, ::1) always are.
``datalad.udocker.execmode``
    udocker execution mode: P1 (default), P2, F1, R1.
``datalad.udocker.dir``
    udocker's directory (repos, layers, containers); default
    ``$XDG_CACHE_HOME/datalad-udocker/udocker`` (env: DATALAD_UDOCKER_DIR).
``datalad.udocker.jobs``
    Parallel layer downloads during import (default 4).
``datalad.udocker.tools-tarball``
    Where udocker's tools tarball is installed from when the host lacks an
    execution tool: files or URLs, or ``udocker`` for udocker's download
    site (default: ``UDOCKER_TARBALL``, else nowhere; see run/tools.py).
"""
import json
import os
import subprocess

from .errors import UdockerError

SPECIAL_REMOTE_NAME = "udocker-registry"
SPECIAL_REMOTE_TYPE = "udocker"   # git-annex-remote-udocker

# datalad-container call format: the runtime's entry point.  {img} is the
# layout directory, {img_dspath} the dataset holding it (both relative to the
# caller's directory, single-quoted for the shell that runs the command; the
# import refuses image paths the quotes cannot hold), {cmd} the command.  The
# console script, not {python}: the run record must rerun for anyone.
CMDEXEC = "datalad-udocker-run -d '{img_dspath}' '{img}' {cmd}"


def _cfg():
    from datalad import cfg
    return cfg


def get(name, default=None, dataset=None):
    """The ``datalad.udocker.<name>`` setting from the user's own config.

    With a ``dataset`` its ``.git/config`` counts too, but never its
    committed ``.datalad/config`` (DataLad's "branch" scope).
    """
    key = "datalad.udocker." + name
    cfg = dataset.config if dataset is not None else _cfg()
    cfg.reload()
    value = cfg.get_from_source("local", key, default=None)
    if isinstance(value, tuple):        # set more than once: the last wins
        value = value[-1]
    return default if value in (None, "") else value


def get_without_datalad(name, default=None, cwd=None):
    """What :func:`get` returns, for a process that must start fast
    (git-annex-remote-udocker): DataLad's environment mapping
    (``DATALAD_UDOCKER_X__Y``, then ``DATALAD_CONFIG_OVERRIDES_JSON``), then
    ``git config`` in ``cwd`` (``.git/config``, global, system and ``-c``
    settings, which DataLad passes on to git-annex in the environment).
    Never a dataset's committed ``.datalad/config``; DataLad is not imported.
    """
    key = "datalad.udocker." + name
    for var, value in os.environ.items():
        if (var.startswith("DATALAD_")
                and var.replace("__", "-").replace("_", ".").lower() == key):
            return value or default
    try:
        value = json.loads(os.environ.get("DATALAD_CONFIG_OVERRIDES_JSON")
                           or "{}").get(key)
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    if value in (None, ""):
        proc = subprocess.run(["git", "config", "--get", key], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
        if proc.returncode not in (0, 1):     # 1: not set
            raise UdockerError("cannot read %s: %s" % (
                key, proc.stderr.strip() or "git config failed"))
        value = proc.stdout.rstrip("\n")
    return default if value in (None, "") else value


def insecure_registries(dataset=None, fast=False):
    """The hosts spoken to over plain http (besides loopback).  ``fast``:
    read with :func:`get_without_datalad` in the current directory."""
    value = (get_without_datalad("insecure-registries", "") if fast
             else get("insecure-registries", "", dataset))
    return {h for h in value.replace(",", " ").split() if h}


def download_jobs(dataset=None):
    try:
        return max(1, int(get("jobs", 4, dataset)))
    except ValueError:
        return 4


def udocker_dir(dataset=None):
    """udocker's directory, absolute (a relative setting is taken relative
    to the current directory, ``~`` is expanded)."""
    # the environment first: no git call when it is set
    value = os.environ.get("DATALAD_UDOCKER_DIR") or get("dir", None, dataset)
    if not value:
        cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        value = os.path.join(cache, "datalad-udocker", "udocker")
    return os.path.abspath(os.path.expanduser(value))


def execmode(dataset=None):
    return str(get("execmode", "P1", dataset)).upper()
