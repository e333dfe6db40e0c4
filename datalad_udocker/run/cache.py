"""The container cache: which containers of imported images exist; making them.

A container is an image extracted for one execution mode, in udocker's
on-disk format, named ``dlu-<manifest hex>-<mode>``; its cache entry is
``$UDOCKER_DIR/datalad-udocker/containers/<name>.json``.  A missing
container is created once (:meth:`ContainerCache.ensure_container`), under
an exclusive per-container file lock, so that concurrent first runs all
succeed and extract only once: missing layers are fetched (``datalad get``),
the container is made in udocker's format by :mod:`.extract` (one read of
each layer verifies its digest, checks the stack's safety and extracts it),
``udocker setup --execmode`` runs, and only then is the cache entry written.
Any failure removes what was created.  Runs hold the lock shared (see
:mod:`.runtime`), so a prune skips containers in use.

A site cache (``datalad.udocker.site-dir``, another account's udocker
directory) is only read: its complete containers run as they are in the
modes that write nothing into them (:data:`SITE_MODES`).
"""
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import config
from ..errors import RuntimeError_
from ..dataset.layout import OCILayout
from .fastpath import fast_record_path
from .udocker_cli import UdockerCLI
from .safe_delete import remove_tree
from ..digest import hex_part
from ..dataset.local import ensure_local
from .udocker_repo import STATE_DIR, UdockerRepo, repo_digest
from .extract import create_container
from .tools import EXEC_MODES, check_execmode, find_tools

__all__ = ["ContainerCache", "CachedContainer", "container_name",
           "disk_usage", "known_udocker_dirs"]

lgr = logging.getLogger("datalad.udocker.runtime")

NAME_PREFIX = "dlu-"
# modes whose runs write nothing into the container directory, so a
# container in a site cache the user cannot write runs as it is (R1 writes
# runc's spec there, F1 creates mount points in the container's root)
SITE_MODES = ("P1", "P2")


@dataclass
class CachedContainer:
    """One cached container: an image extracted for one execution mode."""
    name: str
    container_id: str
    manifest_digest: str
    execmode: str
    image: str           # layout path it was created from
    created: float
    last_used: float = 0.0
    path: str = ""       # udocker's container directory


def container_name(manifest_digest, execmode):
    return "%s%s-%s" % (NAME_PREFIX, hex_part(manifest_digest),
                        execmode.lower())

class ContainerCache:
    """Containers of imported images in one udocker directory, for one mode."""

    def __init__(self, udocker_dir=None, execmode=None, dataset=None):
        self.udocker_dir = Path(os.path.abspath(os.path.expanduser(
            udocker_dir or config.udocker_dir(dataset))))
        self.execmode = check_execmode(execmode or config.execmode(dataset))
        self.state_dir = self.udocker_dir / STATE_DIR
        self.repo = UdockerRepo(self.udocker_dir)
        self.udocker = UdockerCLI(self.udocker_dir, self.state_dir)
        self._dataset = dataset

    # --- cache ------------------------------------------------------------
    def state_path(self, name):
        return self.state_dir / "containers" / (name + ".json")

    @contextlib.contextmanager
    def lock(self, name):
        lock_dir = self.state_dir / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / (name + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o644)
        try:
            yield fd
        finally:
            os.close(fd)

    def _load(self, name):
        """The cache entry for ``name`` if its container is complete."""
        entry = _read_entry(self.state_path(name))
        if entry is None or not (Path(entry.path) / "ROOT").is_dir():
            return None
        return entry

    # --- the site cache (read only) ---------------------------------------
    @functools.cached_property
    def site_dir(self):
        """The site's udocker directory (``datalad.udocker.site-dir``) if it
        is set and safe to use, else None (with a warning when unsafe)."""
        try:
            value = config.get("site-dir", None, self._dataset)
        except OSError:         # no git to ask: no site cache, our own
            return None
        if not value:
            return None
        path = Path(os.path.realpath(os.path.expanduser(value)))
        problem = _unsafe_site_dir(path)
        if problem:
            lgr.warning("ignoring datalad.udocker.site-dir %s: %s", path,
                        problem)
            return None
        return path

    def _site_entry(self, name):
        """The complete container ``name`` in the site cache, or None.

        Only reads there (no lock, no state): the site's account created it
        and nobody else can change it (see :func:`_unsafe_site_dir`); its
        entry and container must not be writable by the user either.
        """
        if self.execmode not in SITE_MODES or self.site_dir is None:
            return None
        site = self.site_dir
        state = site / STATE_DIR / "containers" / (name + ".json")
        entry = _read_entry(state)
        if entry is None or entry.name != name or \
                container_name(entry.manifest_digest, entry.execmode) != name:
            return None
        if not re.fullmatch(r"[0-9a-f-]+", entry.container_id):
            return None
        path = site / "containers" / entry.container_id
        for item in (state, path, path / "ROOT"):
            try:
                owner = os.stat(site).st_uid
                st = os.lstat(item)
            except OSError:
                return None
            if st.st_uid not in (0, owner) or os.access(item, os.W_OK) or \
                    stat.S_ISLNK(st.st_mode):
                lgr.warning("ignoring the site cache's %s: %s", item,
                            "a symlink" if stat.S_ISLNK(st.st_mode) else
                            "writable by you or owned by another account")
                return None
        entry.path = str(path)
        return entry

    def udocker_for(self, entry):
        """udocker on the directory ``entry``'s container lives in (ours,
        or the site cache's), its per-run files in our own state dir."""
        where = Path(entry.path).parent.parent
        if where == self.udocker_dir:
            return self.udocker
        return UdockerCLI(where, self.state_dir)

    def containers(self):
        """Every cached container, plus leftovers of interrupted creations
        (returned as entries with an empty ``container_id``): a ``dlu-*``
        name without a cache entry, or an unnamed container made from one of
        our images (a first run killed while udocker extracted it; its entry
        is named by the container directory)."""
        found = {}
        for state in sorted((self.state_dir / "containers").glob("*.json")):
            entry = self._load(state.stem)
            if entry is not None:
                entry.last_used = state.stat().st_mtime
                found[entry.name] = entry
        cdir = self.udocker_dir / "containers"
        if cdir.is_dir():
            for link in cdir.iterdir():
                if link.name.startswith(NAME_PREFIX) and \
                        link.name not in found:
                    found[link.name] = CachedContainer(
                        link.name, "", "", "", "", 0.0, 0.0, str(link))
        for entry in self._unnamed():
            found.setdefault(entry.name, entry)
        return sorted(found.values(), key=lambda c: c.name)

    def _unnamed(self):
        """Entries for container directories made from an image we fed
        (udocker's ``imagerepo.name`` is ``datalad-udocker/<hex>:...``) that
        no name link and no cache entry refers to."""
        cdir = self.udocker_dir / "containers"
        if not cdir.is_dir():
            return []
        named, dirs = set(), []
        for item in os.scandir(cdir):
            if item.is_symlink():
                named.add(os.path.basename(os.readlink(item.path)))
            elif item.is_dir(follow_symlinks=False):
                dirs.append(item)
        for state in (self.state_dir / "containers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                named.add(json.loads(state.read_text())["container_id"])
        found = []
        for item in dirs:
            if item.name in named:
                continue
            try:
                with open(os.path.join(item.path, "imagerepo.name")) as f:
                    repo = f.read(200)
            except OSError:
                continue
            digest = repo_digest(repo)
            if digest is None:
                continue
            created = item.stat(follow_symlinks=False).st_mtime
            found.append(CachedContainer(item.name, "", digest,
                                         "", "", created, 0.0, item.path))
        return found

    def remove(self, name, wait=False):
        """Remove a cached container unless a command is using it.

        Returns False (and keeps it) when it is in use and ``wait`` is false.
        """
        with self.lock(name) as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            self._discard(name)
        return True

    @contextlib.contextmanager
    def _image_idle(self, manifest_digest):
        """Hold the locks of the image's containers in every mode; yields
        False (holding none) if one is busy: the image is being created or
        run right now."""
        with contextlib.ExitStack() as stack:
            for mode in EXEC_MODES:
                fd = stack.enter_context(
                    self.lock(container_name(manifest_digest, mode)))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    stack.close()
                    yield False
                    return
            yield True

    def _remove_unnamed(self, entry):
        """Remove an unnamed container (see :meth:`_unnamed`) unless its
        image is in use; returns False (and keeps it) then."""
        with self._image_idle(entry.manifest_digest) as idle:
            if idle and entry.name in {e.name for e in self._unnamed()}:
                self._remove_container_dir(entry.name)
        return idle

    def _discard(self, name):
        """Delete container ``name`` and its cache entry (lock held).

        Only what is in udocker's ``containers/`` directory is deleted: a
        name link pointing anywhere else is unlinked, never followed.
        """
        for state in (self.state_path(name), fast_record_path(
                self.state_dir, name)):
            with contextlib.suppress(FileNotFoundError):
                state.unlink()
        link = self.udocker_dir / "containers" / name
        cid = self._named_container(link)
        self._remove_container_dir(name)      # the name link (or a stray dir)
        if cid:
            self._remove_container_dir(cid)

    def _named_container(self, link):
        """The id of the container directory in ``containers/`` that name
        link ``link`` points to, or None."""
        if not os.path.islink(link):
            return None
        target = os.path.realpath(link)
        cdir = os.path.realpath(self.udocker_dir / "containers")
        if os.path.dirname(target) != cdir or not os.path.isdir(target):
            return None
        return os.path.basename(target)

    def _remove_container_dir(self, cid):
        remove_tree(self.udocker_dir / "containers" / cid,
                    self.udocker_dir / "containers")

    def prune(self, older_than=None):
        """Remove cached containers (those unused for ``older_than`` seconds,
        or all), skipping any in use; drop image feeds no container needs.
        Returns ``(removed, kept_in_use)`` lists of CachedContainer."""
        removed, busy = [], []
        now = time.time()
        unnamed = {e.name for e in self._unnamed()}
        for entry in self.containers():
            if older_than is not None and entry.container_id and \
                    now - entry.last_used < older_than:
                continue
            done = self._remove_unnamed(entry) if entry.name in unnamed \
                else self.remove(entry.name)
            (removed if done else busy).append(entry)
        for stale in (self.state_dir / "run").glob("tmp*"):
            # leftovers of killed runs (a live run's directory is recent)
            if now - stale.lstat().st_mtime > 86400:
                remove_tree(stale, self.state_dir / "run")
        needed = {c.manifest_digest for c in self.containers()}
        for digest in self.repo.fed_digests():
            if digest not in needed:
                with self._image_idle(digest) as idle:
                    if idle:        # not being fed or created right now
                        self.repo.remove(digest)
        return removed, busy

    # --- creation ---------------------------------------------------------
    def ensure_container(self, layout, fetch=None):
        """The cached container for ``layout``, created if needed."""
        layout = layout if isinstance(layout, OCILayout) else OCILayout(layout)
        name = container_name(layout.manifest_descriptor().digest,
                              self.execmode)
        with self.lock(name) as fd:
            return self.ensure_locked(fd, name, layout, fetch)

    def ensure_locked(self, fd, name, layout, fetch):
        site = self._site_entry(name)
        if site is not None:
            return site
        fcntl.flock(fd, fcntl.LOCK_SH)
        entry = self._load(name)
        if entry is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entry = self._load(name)
            if entry is None:
                remember_udocker_dir(self.udocker_dir)
                entry = self._create(name, layout, fetch)
            fcntl.flock(fd, fcntl.LOCK_SH)
        return entry

    def _create(self, name, layout, fetch):
        tools = find_tools(self.execmode, self.udocker_dir)
        ensure_local(layout, fetch)
        self._discard(name)          # leftovers of an interrupted creation
        cid = None
        try:
            cid = create_container(self.udocker_dir, self.repo, layout, name)
            self.udocker.setup(cid, self.execmode, tools)
            path = self.udocker_dir / "containers" / cid
            if not (path / "ROOT").is_dir():
                raise RuntimeError_("udocker created no container ROOT in %s"
                                    % path)
            entry = CachedContainer(name, cid,
                                    layout.manifest().digest,
                                    self.execmode, str(layout.path),
                                    time.time(), time.time(), str(path))
            state = self.state_path(name)
            state.parent.mkdir(parents=True, exist_ok=True)
            tmp = state.with_name(".%s.%d" % (state.name, os.getpid()))
            tmp.write_text(json.dumps(asdict(entry), indent=1))
            os.replace(tmp, state)
            return entry
        except BaseException:
            self._discard(name)
            if cid:
                self._remove_container_dir(cid)
            raise


def _read_entry(state_path):
    """The CachedContainer in ``state_path``, or None."""
    try:
        return CachedContainer(**json.loads(Path(state_path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _unsafe_site_dir(path):
    """Why the site cache at ``path`` (real, absolute) must not be used, or
    None: it must be a directory the caller cannot write, owned by another
    account (root or a service user), and it and every directory above it
    must be owned by root or that account and writable by no one else (a
    world-writable directory only with the sticky bit, like /tmp)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return "cannot read it (%s)" % (e.strerror or e)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid == os.geteuid() or os.access(path, os.W_OK):
        return ("it is writable by you: a site cache is made by another "
                "account (use datalad.udocker.dir for your own)")
    owner = st.st_uid
    for item in [path] + list(path.parents):
        st = os.stat(item)
        if st.st_uid not in (0, owner):
            return "%s is owned by uid %d" % (item, st.st_uid)
        if st.st_mode & 0o022 and not (
                st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return "%s is writable by others than its owner" % item
    return None


def disk_usage(path):
    """Bytes on disk under ``path`` (symlinks not followed, each hard-linked
    file counted once, unreadable parts skipped)."""
    seen, total = set(), 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _known_dirs_file():
    return Path(config.cache_dir()) / "dirs"


def known_udocker_dirs():
    """The udocker directories containers were ever created in by this user
    (``datalad.udocker.dir`` may have changed since), oldest first."""
    try:
        lines = _known_dirs_file().read_text().splitlines()
    except OSError:
        return []
    return list(dict.fromkeys(ln for ln in lines if ln.startswith("/")))


def remember_udocker_dir(udocker_dir):
    """Add ``udocker_dir`` to :func:`known_udocker_dirs`; never fails."""
    udocker_dir = str(udocker_dir)
    if "\n" in udocker_dir or udocker_dir in known_udocker_dirs():
        return
    with contextlib.suppress(OSError):
        path = _known_dirs_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:          # one short line: one write
            f.write(udocker_dir + "\n")
