"""Imports into one dataset take turns, and what a killed one left is undone by the next.

Three things under the dataset's git directory make this work:

- ``datalad-udocker/import.lock``: an exclusive ``flock`` (:class:`DatasetLock`).
  Every step that reads or changes what is tracked (the checks, annex keys,
  the index, the worktree, ``.datalad/config``, the commit) runs while it is
  held.  Downloads do not: they only write into the import's own staging dir.
  Setting up the registry special remote (``git annex initremote``, once per
  dataset) runs during the downloads under its own lock, ``remote.lock``
  (:class:`RemoteSetupLock`); it is not rolled back: an import that fails
  may leave the remote set up, ready for the next one.
- ``annex/tmp/datalad-udocker-*``: one staging dir per import
  (:class:`Staging`), created under the dataset lock, with a file ``owner``
  that its import keeps ``flock``-ed until it has removed the dir.  A staging
  dir whose owner lock can be taken belongs to an import that died: the next
  import takes over its layer files (partial downloads resume from them) and
  removes it.  A live import's dir is never touched.
- ``datalad-udocker/journal.json`` (:class:`Journal`): written, under the lock,
  before the commit step changes anything: HEAD, the layout dir, the bytes and
  index entry of ``.datalad/config``, and the annex keys the step is about to
  add.  It is removed when the step ends (committed, or rolled back).  An
  import holding the lock that finds one knows its writer was killed, and
  :meth:`Journal.undo` puts the dataset back as the journal describes.
"""
import base64
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from . import annex
from ..errors import UdockerError

lgr = logging.getLogger("datalad.udocker.store")

STAGING_PREFIX = "datalad-udocker-"
CONFIG = ".datalad/config"


def _state_dir(ds):
    d = Path(ds.repo.dot_git) / "datalad-udocker"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


class DatasetLock:
    """``with DatasetLock(ds):`` waits for any other import into ``ds``."""

    NAME = "import.lock"

    def __init__(self, ds):
        self.path = _state_dir(ds) / self.NAME
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_flock(self.fd):
                lgr.info("waiting for another import into this dataset to "
                         "finish (lock %s)", self.path)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc):
        os.close(self.fd)       # releases the lock
        self.fd = None


class RemoteSetupLock(DatasetLock):
    """Held while an import sets up the registry special remote, which it
    does during its downloads (without the :class:`DatasetLock`): two
    imports never initialise it twice.  Never wait for the dataset lock
    while holding this one."""

    NAME = "remote.lock"


class Staging:
    """This import's staging dir under ``.git/annex/tmp``; see module doc.

    Create it while holding the :class:`DatasetLock`.
    """

    def __init__(self, ds):
        root = Path(ds.repo.dot_git) / "annex" / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        self.fd = os.open(self.path / "owner", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def adopt_dead(self, wanted):
        """Remove staging dirs of dead imports, moving their files named in
        ``wanted`` (layer hex digests) here first, so downloads resume."""
        for other in sorted(self.root.glob(STAGING_PREFIX + "*")):
            if other == self.path or not other.is_dir():
                continue
            try:
                fd = os.open(other / "owner", os.O_RDWR)
            except FileNotFoundError:
                fd = None           # no owner file: not a live import's
            try:
                if fd is not None and not _try_flock(fd):
                    continue        # a live import's dir
                for f in other.iterdir():
                    mine = self.path / f.name
                    if (f.name in wanted and f.is_file()
                            and (not mine.exists()
                                 or mine.stat().st_size < f.stat().st_size)):
                        os.replace(f, mine)
                        lgr.info("resuming the partial download of %s left by "
                                 "an interrupted import", f.name)
                shutil.rmtree(other, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)


class Journal:
    """What a commit step is about to change, so that it can be undone."""

    def __init__(self, path, data):
        self.path, self.data = path, data

    @classmethod
    def begin(cls, ds, layout_rel, new_keys):
        """Record the dataset's state; call with the lock held, before any change."""
        cfg = Path(ds.path) / CONFIG
        data = {
            "head": _head(ds.path),
            "layout": layout_rel,
            "layout_in_head": bool(annex.git(
                ds.path, "ls-tree", "--name-only", "HEAD", "--", layout_rel).strip()),
            "config": base64.b64encode(cfg.read_bytes()).decode()
            if cfg.exists() else None,
            "config_index": annex.git(ds.path, "ls-files", "-s", "--", CONFIG),
            "keys": sorted(new_keys),
        }
        path = _state_dir(ds) / "journal.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cls(path, data)

    @classmethod
    def left_behind(cls, ds):
        """The journal of a killed import, or None; call with the lock held."""
        path = _state_dir(ds) / "journal.json"
        try:
            return cls(path, json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            # torn before its atomic rename cannot happen; a garbled one
            # names nothing we could undo
            raise UdockerError("%s is unreadable; remove it and check the "
                               "dataset with `git status`" % path) from None

    def finish(self):
        self.path.unlink()

    def remove_stale_git_locks(self, ds):
        """Remove ``index.lock`` files git left when it was killed with the
        journal's import: created after the journal (so during that import's
        commit step) and with no git process at work in the dataset."""
        dot_git = Path(ds.repo.dot_git)
        since = self.path.stat().st_mtime
        stale = [p for p in [dot_git / "index.lock"] + list(dot_git.glob("next-index-*.lock"))
                 if p.exists() and p.stat().st_mtime >= since]
        if not stale or _git_running_in(ds.path):
            return
        for p in stale:
            lgr.warning("removing %s, left by git killed with the interrupted "
                        "import", p)
            p.unlink()

    def undo(self, ds_path):
        """Put back what the journal's step changed; then forget the journal.

        If HEAD moved, the step's save went through: nothing to undo.  Keys
        are dropped only if the step added them (absent before it) and no
        file of HEAD points to them.
        """
        d = self.data
        if _head(ds_path) == d["head"]:
            layout = d["layout"]
            annex.git(ds_path, "reset", "-q", "--", layout)
            if d["layout_in_head"]:
                annex.git(ds_path, "checkout", "HEAD", "--", layout)
                annex.git(ds_path, "clean", "-fdq", "--", layout)
            else:
                full = Path(ds_path) / layout
                shutil.rmtree(full, ignore_errors=True)
                try:
                    os.removedirs(full.parent)      # empty parents only
                except OSError:
                    pass
            cfg = Path(ds_path) / CONFIG
            if d["config"] is None:
                if cfg.exists():
                    cfg.unlink()
            else:
                cfg.write_bytes(base64.b64decode(d["config"]))
            if d["config_index"]:
                annex.git(ds_path, "update-index", "--index-info",
                          input=d["config_index"])
            else:
                annex.git(ds_path, "rm", "--cached", "-q", "--ignore-unmatch",
                          "--", CONFIG)
            if d["keys"]:
                referenced = annex.keys_in_tree(ds_path, "HEAD")
                for key in d["keys"]:
                    if key not in referenced:
                        annex.drop_key(ds_path, key)
        self.finish()


def _git_running_in(path):
    """Is any git process (that we may inspect) working in ``path``?  True
    where this cannot be told (no /proc)."""
    root = os.path.realpath(path)
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open("/proc/%s/comm" % pid) as f:
                if not f.read().startswith("git"):
                    continue
            cwd = os.readlink("/proc/%s/cwd" % pid)
        except OSError:
            continue        # gone, or another user's
        if cwd == root or cwd.startswith(root + os.sep):
            return True
    return False


def _head(ds_path):
    return annex.git(ds_path, "rev-parse", "-q", "--verify", "HEAD").strip()
