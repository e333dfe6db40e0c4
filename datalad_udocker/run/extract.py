"""Create a udocker container from an OCI layout, reading each layer once.

``udocker create`` reads every layer twice (``tar t`` for the whiteouts, ``tar x``) and
runs ``chmod``/``chgrp`` over the whole tree after each layer; our digest verification,
the stack check of :mod:`.layer_check` and the restoring of the layers' modes read them
again.  Here one read of each layer blob does all of it:

1. the blob is hashed (:class:`~..digest.HashingReader`; skipped when the file is
   unchanged since it last passed, see :meth:`.UdockerRepo.verification`) and
   decompressed by a thread of its own (:class:`_Unpacker`: on a second core, as ``tar
   -z`` runs gzip), parsed by the :class:`~.layer_check.StackChecker`, and each regular
   file's data is written, as it streams by, to a spool file inside the container
   directory (under our own name, with its final mode and mtime);
2. once the whole layer is read, its digest is compared (a corrupt blob raises
   DigestMismatch) and the checker's verdict is taken (an unsafe stack raises
   UnsafeLayer): nothing of the layer has reached ``ROOT`` yet;
3. the layer is applied to ``ROOT`` in the order udocker would apply it (the checker's
   plan): its whiteouts first, then its members (spool files renamed into place,
   directories, symlinks, hard links, FIFOs).

The result is what ``udocker create`` writes (``containers/<id>/ROOT``, ``imagerepo.name``,
``container.json`` and the name link ``containers/<name>``) with the permissions of the
layers' headers as the previous restore gave them: ``mode & 0o1777`` plus the owner's
read/write (and search, for directories) bits, never setuid/setgid; directories no layer
lists are 0755, whatever the caller's umask; files belong to the caller.  Device nodes
under ``dev/`` and ``etc/udev/devices/`` are not created (udocker excludes them, the
checker refuses devices elsewhere).

Safety does not rest on the model alone: every directory a member is written into is
checked to be a real directory (``lstat``, remembered until something is removed: the
container directory is 0700 until the creation is finished, so only the layers change
``ROOT`` meanwhile, see :func:`_skeleton`), a
member's own name is replaced, never followed, and deletes go through
:func:`.safe_delete.remove_tree`.  Any failure removes the container directory; a
killed creation leaves a container directory with ``imagerepo.name``, which the container
cache lists as a leftover and prunes.
"""
import contextlib
import functools
import json
import os
import queue
import shutil
import stat
import tempfile
import threading
import uuid
from pathlib import Path

from ..digest import HashingReader
from ..errors import LayoutError, RunError, UnsafeLayer
from .layer_check import (OPAQUE, WHITEOUT, StackChecker, is_whiteout, plain_stream,
                          split_name)
from .safe_delete import remove_tree
from .udocker_repo import STATE_DIR, TAG, repo_name

__all__ = ["create_container"]

_KEPT_BITS = 0o1777         # setuid/setgid are dropped on purpose
_OWNER_BITS = 0o600         # the container stays writable and removable by its owner
_DIR_MODE = 0o755           # directories no layer lists (Docker's umask, 022)
_CHUNK = 1 << 20
_PER_DIR = 128              # spool files per directory: creating files in a large one is slow


def create_container(udocker_dir, repo, layout, name):
    """Make container ``name`` (a udocker container name) of ``layout`` in
    ``udocker_dir``; returns the container id.

    Raises LayoutError (a blob is missing), DigestMismatch, UnsafeLayer or RunError;
    then nothing is left in ``containers/``.  The caller holds the container's lock and
    has removed an earlier container of that name.
    """
    manifest = layout.manifest()
    paths = {}
    for desc in (manifest.config,) + tuple(manifest.layers):
        path = layout.blob_path(desc.digest)
        if not path.exists():
            raise LayoutError(
                "layer %s of the image in %s is not present: fetch it with "
                "`datalad get %s`" % (desc.digest, layout.path, layout.path))
        paths[desc.digest] = path
    repo.verify_blob(paths[manifest.config.digest], manifest.config.digest,
                     manifest.config.size)
    containers = Path(udocker_dir) / "containers"
    containers.mkdir(parents=True, exist_ok=True)
    cid = str(uuid.uuid4())
    cdir = containers / cid
    try:
        _skeleton(cdir, "%s:%s" % (repo_name(manifest.digest), TAG),
                  Path(udocker_dir) / STATE_DIR / "run")
        root = _Root(cdir / "ROOT", cdir / ".spool")
        checker = StackChecker()
        for desc in manifest.layers:
            _extract_layer(root, repo, paths[desc.digest], desc, checker)
        root.finish()
        with open(cdir / "container.json", "w") as f:
            json.dump(layout.config(), f)
        os.chmod(cdir, _DIR_MODE)               # finished: others may reach it now
        os.symlink(cid, containers / name)      # udocker's name link: relative
    except BaseException:
        remove_tree(cdir, containers)
        raise
    return cid


def _skeleton(cdir, image, work_dir):
    """``cdir`` with an empty ``ROOT`` and ``imagerepo.name`` (udocker's), made in
    ``work_dir`` and renamed into place: a container directory never lacks its
    ``imagerepo.name``, by which an interrupted creation is recognised (see
    :meth:`.ContainerCache.containers`).  (A skeleton left by a kill is pruned with the other
    ``run/tmp*`` leftovers.)

    ``cdir`` is 0700 until the creation is finished (:func:`create_container` then makes
    it 0755): the layers' modes apply as each is extracted, so an image's 0777 directory
    (or its 1777 ``tmp``) would otherwise let another local user swap a directory for a
    symlink between two writes into it, and the extraction trusts what it checked in
    ``ROOT`` for the rest of the creation (the checks are against the image, not against
    other users).  No one but us (and root) can reach anything under a 0700 directory."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp", dir=work_dir))
    try:
        os.mkdir(tmp / "ROOT", 0o700)
        (tmp / "imagerepo.name").write_text(image)
        os.chmod(tmp / "ROOT", _DIR_MODE)       # tmp stays 0700 (mkdtemp's) until finished
        os.rename(tmp, cdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)      # our own, just made: no symlinks
        raise


def _extract_layer(root, repo, path, desc, checker):
    """Verify, check and apply one layer blob (see the module doc), one read."""
    digest = str(desc.digest)
    stamp, verified = repo.verification(path, digest, desc.size)
    spool = root.new_spool()
    unsafe = None
    with open(path, "rb") as f, _Unpacker(f if verified else HashingReader(f)) as plain:
        try:
            plan = checker.check_layer(digest, plain, spool.take, decompressed=True)
        except UnsafeLayer as exc:
            unsafe, plan = exc, []
        if not verified:
            plain.finish()          # the rest the tar reader did not need, hashed
            repo.check_digest(digest, plain.raw.digest)    # a corrupt blob: before unsafe
    if unsafe is not None:
        raise unsafe
    if not verified:
        repo.remember(stamp)
    try:
        root.apply(plan, spool)
    except OSError as exc:
        raise RunError("could not extract layer %s: %s" % (digest, exc)) from None
    spool.remove()


_END = object()


class _Unpacker:
    """The tar bytes of a layer blob read from ``raw``, decompressed (and hashed, when
    ``raw`` is a HashingReader) by a thread of its own, a chunk ahead: zlib, zstandard and
    hashlib release the GIL, so that work runs on another core while the headers are
    parsed and the files written, as ``tar -z`` runs gzip beside tar.  Read errors are
    raised by :meth:`read`, where the checker reports them as the layer's."""

    def __init__(self, raw):
        self.raw = raw
        self._queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._chunk, self._pos, self._ended = b"", 0, False
        self._thread = threading.Thread(target=self._work, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._wait_end()
        self._thread.join()

    def _work(self):
        try:
            plain = plain_stream(self.raw)
            while not self._stop.is_set():
                data = plain.read(_CHUNK)
                if not data:
                    break
                self._queue.put(data)
        except Exception as exc:    # noqa: BLE001 -- handed to the reader, see read()
            self._queue.put(exc)
        finally:
            self._queue.put(_END)

    def _wait_end(self):
        while not self._ended:
            if self._queue.get() is _END:
                self._ended = True

    def read(self, size=-1):
        parts = []
        while size != 0:
            if self._pos == len(self._chunk):
                if self._ended:
                    break
                item = self._queue.get()
                if item is _END:
                    self._ended = True
                    break
                if isinstance(item, Exception):
                    self._wait_end()
                    raise item
                self._chunk, self._pos = item, 0
            n = len(self._chunk) - self._pos if size < 0 else \
                min(size, len(self._chunk) - self._pos)
            parts.append(self._chunk[self._pos:self._pos + n])
            self._pos += n
            size -= n if size > 0 else 0
        return b"".join(parts)

    def finish(self):
        """Read to the end of the blob (``raw`` then has seen every byte)."""
        with contextlib.suppress(Exception):
            while self.read(_CHUNK):
                pass
        self._wait_end()
        self._thread.join()
        if hasattr(self.raw, "drain"):
            self.raw.drain()        # after a read error: the bytes no one decompressed


class _Spool:
    """The data of one layer's regular files, one file each, until they are placed."""

    def __init__(self, path, umask):
        self.path, self.umask = path, umask
        self.files = {}             # id(TarInfo) -> spool file
        os.mkdir(path, 0o700)

    def take(self, tar, info):
        """Spool the data of member ``info`` (called by the checker as it reads it)."""
        if not info.isreg():
            return
        n = len(self.files)
        dest = os.path.join(self.path, str(n // _PER_DIR), str(n))
        with self._writing():
            if n % _PER_DIR == 0:
                os.mkdir(os.path.dirname(dest), 0o700)
            mode = (info.mode & _KEPT_BITS) | _OWNER_BITS
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         mode & 0o777)
        with open(fd, "wb", buffering=0) as out:
            source = tar.extractfile(info) if info.size else None
            while source is not None:
                data = source.read(_CHUNK)  # the layer's errors are the checker's
                if not data:
                    break
                with self._writing():
                    out.write(data)
            with self._writing():
                if mode & (self.umask | ~0o777):    # the umask took bits, or a sticky bit
                    os.fchmod(fd, mode)
                os.utime(fd, (info.mtime, info.mtime))
        self.files[id(info)] = dest

    def remove(self):
        shutil.rmtree(self.path)        # our own files only

    @contextlib.contextmanager
    def _writing(self):
        """Errors writing the spool are ours, not the layer's (RunError passes the checker)."""
        try:
            yield
        except OSError as exc:
            raise RunError("could not write the container's files in %s: %s"
                           % (self.path, exc.strerror or exc)) from None


class _Root:
    """The container's ``ROOT``, written to member by member, never through a symlink."""

    def __init__(self, path, spool_path):
        self.path = str(path)
        self.spool_path = str(spool_path)
        self.dirs = {""}            # relative paths known to be real directories
        self.umask = _umask()
        self.dir_times = {}         # directory -> mtime of the last header listing it

    def new_spool(self):
        return _Spool(self.spool_path, self.umask)

    def apply(self, plan, spool):
        for info in plan:
            parts = split_name(info.name)       # the checker's reading of the name
            if is_whiteout(parts):
                self._whiteout(parts)
            else:
                self._member("/".join(parts), info, spool)

    def finish(self):
        """Directory mtimes, once nothing more is written into them."""
        for rel, mtime in sorted(self.dir_times.items(), reverse=True):
            path = self._abs(rel)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.lstat(path).st_mode) and self._is_dir(
                        rel.rpartition("/")[0], create=False):
                    os.utime(path, (mtime, mtime), follow_symlinks=False)

    # --- the file system -----------------------------------------------------------------
    def _abs(self, rel):
        return os.path.join(self.path, rel) if rel else self.path

    def _is_dir(self, rel, create):
        """Whether ``rel`` is a real directory (made, with its parents, if ``create``:
        something else in the way is replaced, as the checker's model does).  Raises
        RunError on a symlink: the checker refuses such paths, this is a second guard."""
        if rel in self.dirs:
            return True
        head = rel.rpartition("/")[0]
        if not self._is_dir(head, create):
            return False
        path = self._abs(rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISLNK(mode):
            raise RunError("refusing to extract through the symlink %s" % path)
        if mode is None or not stat.S_ISDIR(mode):
            if not create:
                return False
            if mode is not None:
                os.unlink(path)
            os.mkdir(path, _DIR_MODE)
            os.chmod(path, _DIR_MODE)       # whatever the umask
        self.dirs.add(rel)
        return True

    def _remove(self, rel):
        remove_tree(self._abs(rel), self.path)
        self.dirs = {""}            # rarely needed again: forget, re-check lazily

    def _whiteout(self, parts):
        head = "/".join(parts[:-1])
        if not self._is_dir(head, create=False):
            return
        if parts[-1] == OPAQUE:
            for entry in os.listdir(self._abs(head)):
                self._remove(head + "/" + entry if head else entry)
            return
        target = (head + "/" if head else "") + parts[-1][len(WHITEOUT):]
        if os.path.lexists(self._abs(target)):
            self._remove(target)

    def _clear(self, rel, path):
        """Make room for a new entry at ``rel`` (the entry there is replaced, never
        followed; a directory is in the plan only where the checker's model drops it)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            self._remove(rel)
        else:
            os.unlink(path)

    def _member(self, rel, info, spool):
        head = rel.rpartition("/")[0]
        if rel:
            self._is_dir(head, create=True)
        path = self._abs(rel)
        want = (info.mode & _KEPT_BITS) | _OWNER_BITS
        if info.isdir():
            if rel and not self._is_dir(rel, create=True):
                return
            os.chmod(path, want | 0o100)
            self.dir_times[rel] = info.mtime
            return
        if info.isreg():
            make = functools.partial(os.rename, spool.files.pop(id(info)))
        elif info.issym():
            make = functools.partial(os.symlink, info.linkname)
        elif info.islnk():
            target = "/".join(split_name(info.linkname))
            if not self._is_dir(target.rpartition("/")[0], create=False):
                raise RunError("hard link %s: its target %s is missing"
                               % (info.name, info.linkname))
            make = functools.partial(os.link, self._abs(target), follow_symlinks=False)
        elif info.isfifo():
            make = functools.partial(_mkfifo, mode=want)
        else:       # devices outside dev/ are refused by the checker, those in it skipped
            raise RunError("unexpected member type of %s" % info.name)
        try:        # rename replaces a file or symlink (the entry, never its target)
            make(path)
        except (FileExistsError, IsADirectoryError):
            self._clear(rel, path)
            make(path)
        if info.issym() or info.isfifo():   # a hard link is its target's inode
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)


def _mkfifo(path, mode):
    os.mkfifo(path, 0o600)
    os.chmod(path, mode)


def _umask():
    """This process's umask, read without changing it (Linux >= 4.7); else 0o777: files
    are then always given their mode explicitly."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o777
