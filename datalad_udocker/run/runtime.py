"""Run an image stored in a dataset with udocker: no root, no daemon.

Python API::

    from datalad_udocker.runtime import run_image
    result = run_image("/data/ds/.datalad/environments/busybox/image",
                       ["sh", "-c", "echo hello"], dataset="/data/ds")
    result.exit_code, result.stdout, result.stderr   # or: code, out, err = result

Life of a run (:meth:`Runtime.run`):

1. The image's container for the execution mode is looked up in the cache
   (``$UDOCKER_DIR/datalad-udocker/containers/<name>.json``, the name being
   ``dlu-<manifest hex>-<mode>``).  If it is missing it is created once,
   under an exclusive per-container file lock, so that concurrent first runs
   all succeed and extract only once: missing layers are fetched
   (``datalad get``), the container is made in udocker's format by
   :mod:`.extract` (one read of each layer verifies its digest, checks the
   stack's safety and extracts it), ``udocker setup --execmode`` runs, and
   only then is the cache entry written.  Any failure removes what was
   created.
2. The command runs with ``udocker run`` while a shared lock is held (a
   prune skips containers in use).  Docker semantics: the image's Env,
   Entrypoint and Cmd (an empty command runs Entrypoint + Cmd), the dataset
   bind-mounted at its own path and the caller's directory inside it as the
   working directory (without a dataset: the image's WorkingDir).  Output
   and exit code are the command's own (see :mod:`.tools`).

udocker is always run as a subprocess (its CLI and on-disk layout are the
contract), from a directory we own since it reads ``u.conf`` from its cwd.
"""
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shlex
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .. import config
from ..errors import RuntimeError_
from ..dataset.layout import OCILayout
from .fastpath import FastPath, expected_command, fast_record_path
from .udocker_cli import CommandNotFound, UdockerCLI
from .safe_delete import remove_tree
from ..digest import hex_part, sha256_digest
from ..dataset.local import datalad_get as fetch_with_datalad, ensure_local
from .udocker_repo import STATE_DIR, UdockerRepo, repo_digest
from .extract import create_container
from .tools import EXEC_MODES, check_execmode, find_tools

__all__ = ["run_image", "RunResult", "Runtime", "CachedContainer",
           "CommandNotFound", "plan_mounts"]

lgr = logging.getLogger("datalad.udocker.runtime")

NAME_PREFIX = "dlu-"
# modes whose runs write nothing into the container directory, so a
# container in a site cache the user cannot write runs as it is (R1 writes
# runc's spec there, F1 creates mount points in the container's root)
SITE_MODES = ("P1", "P2")
_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class RunResult:
    """Outcome of a command; ``stdout``/``stderr`` are bytes when captured."""
    exit_code: int
    stdout: Optional[bytes] = None
    stderr: Optional[bytes] = None

    def __iter__(self):
        return iter((self.exit_code, self.stdout, self.stderr))


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


class Runtime:
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
    def _state_path(self, name):
        return self.state_dir / "containers" / (name + ".json")

    @contextlib.contextmanager
    def _lock(self, name):
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
        entry = _read_entry(self._state_path(name))
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

    def _udocker_for(self, entry):
        """udocker on the directory ``entry``'s container lives in (ours,
        or the site cache's), its per-run files in our own state dir."""
        where = Path(entry.path).parent.parent
        if where == self.udocker_dir:
            return self.udocker
        return UdockerCLI(where, self.state_dir)

    def _site_volumes(self, entry):
        """For a site container, the host's /tmp and /var/tmp over the
        image's (as Apptainer does): no user writes into the shared
        container's world-writable directories."""
        if self._udocker_for(entry) is self.udocker:
            return []
        return ["--volume=%s:%s" % (d, d) for d in ("/tmp", "/var/tmp")
                if os.path.isdir(d)]

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
        with self._lock(name) as fd:
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
                    self._lock(container_name(manifest_digest, mode)))
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
        for state in (self._state_path(name), fast_record_path(
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
        with self._lock(name) as fd:
            return self._ensure_locked(fd, name, layout, fetch)

    def _ensure_locked(self, fd, name, layout, fetch):
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
            state = self._state_path(name)
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

    # --- running ----------------------------------------------------------
    def run(self, layout, command=(), dataset=None, cwd=None, env=None,
            capture=False, fetch=None, entrypoint=None):
        """Run ``command`` (a list; empty: Entrypoint + Cmd) in the image.

        ``dataset`` (a path) is bind-mounted at its own path and the
        command runs in ``cwd`` (default: the current directory) if that is
        inside it, else in the dataset's root; without a dataset it runs in
        the image's WorkingDir.  ``env`` adds or overrides variables
        (their values never appear on a command line, see
        :meth:`.UdockerCLI.run`),
        ``entrypoint`` replaces the image's Entrypoint (``docker run
        --entrypoint``).
        With ``capture`` the output is returned, else it goes to this
        process's stdout/stderr.  Returns a RunResult; raises UdockerError
        subclasses when the command could not be started.

        Signals sent to this process during the run go to the command as
        under ``docker run``; ``datalad.udocker.stop-timeout`` seconds
        (default 10) after a TERM, INT, HUP or QUIT every process of the run
        is killed and the exit code is 137 (see :meth:`.UdockerCLI.run`).
        """
        bad = [k for k in (env or {}) if not _ENV_NAME.match(str(k))]
        if bad:
            raise RuntimeError_("invalid environment variable name %r: use "
                                "letters, digits and _ (not first a digit)"
                                % bad[0])
        layout = layout if isinstance(layout, OCILayout) else OCILayout(layout)
        name = container_name(layout.manifest_descriptor().digest,
                              self.execmode)
        with self._lock(name) as fd:
            entry = self._ensure_locked(fd, name, layout, fetch)
            with contextlib.suppress(FileNotFoundError):   # site's: none
                os.utime(self._state_path(name))        # last used
            binds, workdir = plan_mounts(dataset, cwd)
            if workdir is None:
                workdir = (layout.config().get("config") or {}).get(
                    "WorkingDir") or "/"
            opts = ["--nobanner", "--workdir=" + workdir]
            opts += volume_options(binds, self.execmode, self.state_dir)
            opts += identity_options(
                self.execmode, layout.config().get("config") or {},
                entry.path, self.state_dir, env)
            opts += self._site_volumes(entry)
            if self.execmode in SITE_MODES and \
                    self._udocker_for(entry) is self.udocker:
                make_mount_points(Path(entry.path) / "ROOT", binds)
            if entrypoint:
                opts.append("--entrypoint=" + entrypoint)
            if self.execmode == "F1":
                # Debian's libfakechroot ignores udocker's FAKECHROOT_DIR_MAP:
                # exclude the bound paths from the chroot instead
                opts += ["--nosysdirs", "--env=FAKECHROOT_EXCLUDE_PATH=" +
                         ":".join(["/dev", "/proc", "/sys", "/etc/resolv.conf",
                                   "/etc/host.conf"] + binds)]
            if self.execmode == "R1":
                # runc's spec (config.json, the env included) is written
                # into the container directory: only the user may read it
                os.chmod(entry.path, 0o700)
            tools = find_tools(self.execmode, self.udocker_dir)
            udocker = self._udocker_for(entry)
            fast = None
            if self.execmode in SITE_MODES and not env:
                line = expected_command(command, entrypoint, layout.config())
                if line:
                    fast = FastPath(
                        self.state_dir, udocker.udocker_dir, name, entry.path,
                        tools, [o for o in opts if o.startswith("--volume=")],
                        entrypoint, workdir, line)
            try:
                code, out, err = udocker.run(
                    opts, entry.container_id, command, tools, capture, env,
                    grace=config.stop_timeout(), fast=fast)
            finally:
                if self.execmode == "R1":
                    _drop_runc_spec(fd, entry.path)
            return RunResult(code, out, err)


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


def _drop_runc_spec(fd, container_path):
    """Remove runc's spec (it holds the run's env values) unless another run
    of this container is using it; the last one to finish removes it.

    udocker writes a new spec for every run.  ``fd`` is the container's lock,
    held shared by every run.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(container_path, "config.json"))


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


def plan_mounts(dataset, cwd=None):
    """``(bind paths, workdir)`` for a run in ``dataset`` from ``cwd``.

    Without a dataset: nothing bound, workdir None (the image's).
    """
    if dataset is None:
        return [], None
    ds = os.path.abspath(str(dataset))
    cwd = os.path.abspath(cwd or os.getcwd())
    binds = [ds]
    real = os.path.realpath(ds)
    if real != ds:
        binds.append(real)
    for root in binds:
        if cwd == root or cwd.startswith(root.rstrip("/") + "/"):
            return binds, cwd
    return binds, ds


# the host paths udocker's PRoot engine binds at themselves when they exist
# (its ``sysdirs_list``)
PROOT_SYSTEM_BINDS = ("/dev", "/proc", "/sys", "/etc/resolv.conf",
                      "/etc/host.conf", "/lib/modules")


def make_mount_points(root, binds):
    """Make the mount points of a P1/P2 run in the container's ``root``: the
    paths of ``binds`` and udocker's system binds, each a directory or an
    empty file as its host path is; what exists is left as it is.

    PRoot makes a missing one itself and removes it when it ends: in a
    container shared by concurrent runs, one run's removal then races
    another's start, which runs without its bind (without the dataset, in
    /, after a mere PRoot warning).  Ours stay, so PRoot neither makes nor
    removes any.  No symlink in ``root`` is followed (one could lead out of
    it): such a path, or one that cannot be made, is left to PRoot.
    """
    for path in list(binds) + [p for p in PROOT_SYSTEM_BINDS
                               if os.path.exists(p)]:
        for _ in range(3):      # a PRoot of another run removed a parent
            try:
                _make_mount_point(str(root), path, os.path.isdir(path))
                break
            except FileNotFoundError:
                continue
            except OSError:     # a symlink, a non-directory, no permission
                break


def _make_mount_point(root, path, directory):
    parts = path.split("/")[1:]
    if not path.startswith("/") or not all(
            p not in ("", ".", "..") for p in parts):
        return
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(root, nofollow)
    try:
        for name in parts[:-1] if not directory else parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            sub = os.open(name, nofollow, dir_fd=fd)
            os.close(fd)
            fd = sub
        if not directory:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(parts[-1], os.O_WRONLY | os.O_CREAT |
                                 os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def volume_options(binds, execmode, state_dir):
    """``--volume`` options binding each path of ``binds`` at itself.

    udocker splits ``--volume=HOST:CONTAINER`` at the first ``:`` (no
    escaping), and the container side may hold more: a host path with a
    ``:`` is bound through a colon-free symlink to it, made in
    ``state_dir``/binds.  F1 cannot bind such a path at all: Fakechroot's
    path lists are ``:``-separated.
    """
    for path in binds:
        if ":" in path and execmode == "F1":
            raise RuntimeError_(
                "cannot run in execmode F1 in %s: Fakechroot cannot bind a "
                "path containing ':'; use execmode P1 or R1, or move the "
                "dataset" % path)
    return [_volume(path, path, state_dir) for path in binds]


def _volume(host, container, state_dir):
    """``--volume`` binding ``host`` at ``container`` (see volume_options)."""
    if ":" in host:
        host = _bind_alias(Path(state_dir) / "binds", host)
    return "--volume=%s:%s" % (host, container)


def _bind_alias(alias_dir, target):
    """A symlink in ``alias_dir`` (made if need be) to ``target``, named by
    its hash so that every run of ``target`` uses the same one."""
    alias = alias_dir / sha256_digest(target.encode()).hex[:32]
    if ":" in str(alias):
        raise RuntimeError_(
            "cannot bind %s: both it and the udocker directory %s contain "
            "':'; set datalad.udocker.dir to a path without ':'"
            % (target, alias_dir.parent.parent))
    with contextlib.suppress(OSError):
        if os.readlink(alias) == target:
            return str(alias)
    alias_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = alias_dir / (".%s.%d" % (alias.name, os.getpid()))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, alias)      # atomic: a concurrent run sees old or new
    return str(alias)


def identity_options(execmode, image_config, container_path, state_dir,
                     env=None):
    """udocker options giving the command the identity ``docker run`` gives
    it, as far as ``execmode`` can (docs/runtime.rst, "Identity").

    The image's ``User`` (default root) is looked up in the image's own
    /etc/passwd as Docker does.  PRoot (P1, P2) runs as that uid: udocker is
    told to use the image's /etc/passwd as is (it would otherwise bind a
    copy of it and run a non-root user it finds there as the caller's uid).
    Fakechroot (F1) runs as the caller, runc (R1) as root: each can fake no
    other identity.  ``HOME`` is the user's home in every mode unless the
    image's Env or ``env`` sets it.
    """
    user = _docker_user(image_config.get("User") or "root",
                        _image_passwd(container_path))
    if user is None:                # a name not in /etc/passwd: udocker's way
        return []
    uid, home, found = user
    opts = []
    if execmode in ("P1", "P2"):
        if found:       # udocker then runs the uid it finds there, as it is
            opts.append(_volume(str(Path(container_path) / "ROOT/etc/passwd"),
                                "/etc/passwd", state_dir))
        # else udocker adds the uid to a copy of /etc/passwd, with the
        # caller's gid ("UID:GID" would become the user's name)
        opts.append("--user=" + uid)
    names = [str(e).split("=", 1)[0] for e in image_config.get("Env") or []]
    if "HOME" not in names and "HOME" not in (env or {}):
        opts.append("--env=HOME=" + home)
    return opts


def _image_passwd(container_path):
    """The text of the image's /etc/passwd in the container at
    ``container_path`` ("" if none).  udocker's R1 setup moves it aside
    (``.bind_orig_files``) and leaves a symlink; no symlink is followed,
    in the path either (one could point at the host's files)."""
    root = Path(os.path.realpath(container_path))
    for rel in ("ROOT/etc/passwd", ".bind_orig_files/#etc#passwd"):
        path = root / rel
        if os.path.realpath(path) == str(path) and path.is_file():
            try:
                return path.read_text(errors="replace")
            except OSError:
                return ""
    return ""


def _docker_user(spec, passwd):
    """``(uid, home, found in passwd)`` for a ``User`` of ``spec``
    (``user[:group]``, a name or a uid) as Docker resolves it, or None for a
    user name that is not in ``passwd``."""
    name = spec.partition(":")[0]
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and (fields[0] == name or
                                 (name.isdigit() and fields[2] == name)):
            return fields[2], fields[5] or "/", True
    return (name, "/", False) if name.isdigit() else None


def run_image(image_path, command=(), dataset=None, execmode=None,
              capture=True, env=None, cwd=None, udocker_dir=None,
              entrypoint=None):
    """Run ``command`` in the image stored (as an OCI layout) at ``image_path``.

    ``command`` is a list of arguments or a string (split like a shell);
    empty runs the image's Entrypoint + Cmd.  ``dataset`` is the dataset to
    bind-mount (and to ``datalad get`` missing layers from; default: the one
    holding the image, for fetching only).  ``execmode`` defaults to
    ``datalad.udocker.execmode`` (P1).  ``env`` (a dict) adds variables,
    ``entrypoint`` replaces the image's.  With ``capture`` (default) the
    output is returned as bytes, else it goes to this process's stdout and
    stderr.  Returns a :class:`RunResult`; raises a
    :class:`~.errors.UdockerError` (:class:`CommandNotFound` for a command
    missing in the image) when the command could not be started.
    """
    if isinstance(command, str):
        command = shlex.split(command)
    # settings are read with git in the dataset (a path: no DataLad import
    # on this path), all at once (:func:`.config.reading_once`)
    with config.reading_once():
        runtime = Runtime(udocker_dir, execmode,
                          str(dataset) if dataset is not None else None)
        fetch = fetch_with_datalad(str(dataset) if dataset is not None
                                   else None)
        return runtime.run(image_path, command, dataset=dataset, cwd=cwd,
                           env=env, capture=capture, fetch=fetch,
                           entrypoint=entrypoint)
