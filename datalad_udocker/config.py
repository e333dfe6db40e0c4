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
``datalad.udocker.jobs``
    Parallel layer downloads during import (default 4).
"""
import os

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


def insecure_registries(dataset=None):
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
        cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        value = os.path.join(cache, "datalad-udocker", "udocker")
    return os.path.abspath(os.path.expanduser(value))


def execmode(dataset=None):
    return str(get("execmode", "P1", dataset)).upper()


def stop_timeout(dataset=None):
    try:
        return max(0.0, float(get("stop-timeout", 10, dataset)))
    except ValueError:
        return 10.0
