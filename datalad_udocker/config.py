"""Names of every setting this package reads, in one place.

DataLad config (``git config`` / ``.datalad/config`` / ``DATALAD_*`` env):

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
    """A ``datalad.udocker.<name>`` setting from the dataset's or global config."""
    key = "datalad.udocker." + name
    cfg = dataset.config if dataset is not None else _cfg()
    cfg.reload()
    value = cfg.get(key, default=None)
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
    env = os.environ.get("DATALAD_UDOCKER_DIR")
    if env:
        return env
    value = get("dir", None, dataset)
    if value:
        return os.path.expanduser(value)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "datalad-udocker", "udocker")


def execmode(dataset=None):
    return str(get("execmode", "P1", dataset)).upper()
