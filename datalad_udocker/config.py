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
``datalad.udocker.stop-timeout``
    Seconds an interrupted run's command gets to end after the TERM, INT,
    HUP or QUIT passed on to it, before every process of the run is killed
    (default 10, as ``docker stop``).
``datalad.udocker.site-dir``
    A site-wide udocker directory of containers created by another account
    (root or a service user), used read-only before the user's own cache
    (P1/P2 only); ignored with a warning when the user could write it.
``datalad.udocker.blob-cache``
    ``false`` turns off the user's own blob cache
    (``$XDG_CACHE_HOME/datalad-udocker/blobs``; default on): registry
    layers are then downloaded once per clone (see dataset/blobcache.py).
``datalad.udocker.blob-cache-site``
    A shared directory of verified registry blobs (``sha256/<hex>``),
    consulted after the user's own cache, and filled by whoever may write
    it (env: DATALAD_UDOCKER_BLOB__CACHE__SITE).
``datalad.udocker.blob-cache-lock-wait``
    Seconds a fill waits for another process's lock on the same blob
    before downloading it anyway (default 300).
``datalad.udocker.jobs``
    Parallel layer downloads during import, and byte ranges of one large
    layer fetched at once by the registry special remote (default 4).
``datalad.udocker.tools-tarball``
    Where udocker's tools tarball is installed from when the host lacks an
    execution tool: files or URLs, or ``udocker`` for udocker's download
    site (default: ``UDOCKER_TARBALL``, else nowhere; see run/tools.py).
"""
import contextlib
import json
import os
import subprocess
import sys

from .errors import UdockerError

SPECIAL_REMOTE_NAME = "udocker-registry"
SPECIAL_REMOTE_TYPE = "udocker"   # git-annex-remote-udocker

# datalad-container call format: the runtime's entry point.  {img} is the
# layout directory, {img_dspath} the dataset holding it (both relative to the
# caller's directory, single-quoted for the shell that runs the command; the
# import refuses image paths the quotes cannot hold), {cmd} the command.  The
# console script, not {python}: the run record must rerun for anyone.
CMDEXEC = "datalad-udocker-run -d '{img_dspath}' '{img}' {cmd}"


def get(name, default=None, dataset=None):
    """The ``datalad.udocker.<name>`` setting from the user's own config.

    In order: DataLad's environment mapping (``DATALAD_UDOCKER_X__Y``),
    DataLad's overrides (``datalad -c``, in this process or passed on in
    ``DATALAD_CONFIG_OVERRIDES_JSON``), then ``git config`` in the
    ``dataset`` (a Dataset or a path; default: the current directory), which
    reads its ``.git/config``, global and system files.  Never a dataset's
    committed ``.datalad/config``.  DataLad is not imported, so the special
    remote uses this too and starts fast.
    """
    key = "datalad.udocker." + name
    for var, value in os.environ.items():
        if (var.startswith("DATALAD_")
                and var.replace("__", "-").replace("_", ".").lower() == key):
            return value or default
    value = _override(key)
    if value in (None, ""):
        value = _git_settings(getattr(dataset, "path", dataset)).get(key)
    return default if value in (None, "") else value


# {directory: settings} while :func:`reading_once` is active, else None
_snapshot = None


@contextlib.contextmanager
def reading_once():
    """Within this, each directory's ``datalad.udocker.*`` git settings are
    read once (one ``git config`` call for all of them), not per setting:
    for one short operation such as a run.  Nests."""
    global _snapshot
    outer = _snapshot
    if outer is None:
        _snapshot = {}
    try:
        yield
    finally:
        _snapshot = outer


def _git_settings(cwd):
    """Every ``datalad.udocker.*`` setting of ``git config`` run in ``cwd``
    (None: the current directory), the last value of each, with one call."""
    if _snapshot is not None:
        where = os.path.abspath(str(cwd) if cwd is not None else ".")
        if where not in _snapshot:
            _snapshot[where] = _read_git_settings(cwd)
        return _snapshot[where]
    return _read_git_settings(cwd)


def _read_git_settings(cwd):
    proc = subprocess.run(["git", "config", "-z", "--get-regexp",
                           r"^datalad\.udocker\."], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    if proc.returncode not in (0, 1):     # 1: none set
        raise UdockerError("cannot read the datalad.udocker settings: %s" % (
            proc.stderr.decode(errors="replace").strip()
            or "git config failed"))
    settings = {}
    for item in proc.stdout.decode(errors="surrogateescape").split("\0"):
        if item:
            # "key\nvalue" ("key" alone: no value, as `git config --get`)
            key, _, value = item.partition("\n")
            settings[key] = value
    return settings


def _override(key):
    """``key`` as set with ``datalad -c`` (last value wins), or None."""
    overrides = {}
    try:
        overrides = json.loads(
            os.environ.get("DATALAD_CONFIG_OVERRIDES_JSON") or "{}")
    except ValueError:
        pass
    datalad = sys.modules.get("datalad")
    cfg = getattr(datalad, "cfg", None)
    if cfg is not None and isinstance(getattr(cfg, "overrides", None), dict):
        overrides = dict(overrides, **cfg.overrides)
    value = overrides.get(key) if isinstance(overrides, dict) else None
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    return value


def insecure_registries(dataset=None):
    """The hosts spoken to over plain http (besides loopback)."""
    value = get("insecure-registries", "", dataset)
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
        value = os.path.join(cache_dir(), "udocker")
    return os.path.abspath(os.path.expanduser(value))


def cache_dir():
    """The user's ``datalad-udocker`` cache directory (XDG), absolute."""
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return os.path.abspath(os.path.expanduser(
        os.path.join(cache, "datalad-udocker")))


def execmode(dataset=None):
    return str(get("execmode", "P1", dataset)).upper()


def stop_timeout(dataset=None):
    try:
        return max(0.0, float(get("stop-timeout", 10, dataset)))
    except ValueError:
        return 10.0
