"""Put an image into a dataset: OCI layout JSON in git, layers in git-annex.

This is where a layer byte goes (read top to bottom):

1. ``_download_missing``: each layer not yet in the local annex is fetched by
   its source (registry, archive) into this import's staging dir under
   ``.git/annex/tmp``, hashed on the fly; a wrong digest never gets further.
2. ``_commit``: only when every layer is verified does the dataset change:
   the layout's ``blobs/sha256/<hex>`` becomes a symlink to the git-annex
   key ``SHA256-s<size>--<hex>`` (= its registry digest), each staged file
   is moved into the annex as that key's content (no re-hashing, no
   git-annex process per layer), its registry URL is registered (claimed by
   our special remote, which is marked as having it; meanwhile, as git-annex
   starts that remote to ask it), the JSON goes to git,
   datalad-container learns the image, and one ``git commit`` of exactly
   the paths the import changed records it all.

Imports into one dataset take turns on a lock (see ``recovery``): the checks
and the commit step hold it, downloads do not.  A failure or interrupt in the
commit step is rolled back from its journal, which removes only keys that
step added and no commit refers to; an import killed there is rolled back by
the next one, which also resumes the killed one's partial downloads.
"""
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from datalad.log import log_progress
from datalad.runner.exception import CommandError

from . import annex
from .. import config
from ..digest import annex_key
from ..errors import UdockerError
from .layout import OCILayout, write_json_files
from .recovery import (CONFIG, DatasetLock, Journal, RemoteSetupLock,
                       Staging)

lgr = logging.getLogger("datalad.udocker.store")

GITATTRIBUTES = "* annex.largefiles=nothing\n"


@dataclass
class StoreOutcome:
    status: str                  # "ok" or "notneeded"
    path: str
    name: str
    manifest_digest: str
    downloaded: List[str] = field(default_factory=list)   # layer digests
    reused: List[str] = field(default_factory=list)
    message: str = ""


def default_image_path(ds_path, name):
    return Path(ds_path) / ".datalad" / "environments" / name / "image"


def store_image(ds, image, path=None, name=None, jobs=4):
    """Store ``image`` (a source.ImageSource) in dataset ``ds``; see module doc."""
    name = name or image.default_name
    layout_dir = Path(path) if path else default_image_path(ds.path, name)
    if not layout_dir.is_absolute():
        layout_dir = Path(ds.path) / layout_dir
    layout_dir = Path(os.path.normpath(layout_dir))
    try:
        relpath = layout_dir.relative_to(ds.path).as_posix()
    except ValueError:
        raise UdockerError("%s is outside the dataset %s; give a path inside "
                           "it" % (layout_dir, ds.path)) from None
    if relpath == "." or relpath.startswith(".git/") or relpath == ".git":
        raise UdockerError("cannot store an image at %s; give a directory "
                           "inside the dataset" % layout_dir)
    from ..callformat import check_image_path   # what containers-run can pass
    check_image_path(relpath)
    if not hasattr(ds.repo, "call_annex"):
        raise UdockerError("dataset %s has no git-annex; create it with "
                           "`datalad create` (without --no-annex)" % ds.path)
    outcome = StoreOutcome("ok", str(layout_dir), name, image.manifest.digest)
    keys = {l.descriptor.digest: annex_key(l.descriptor.digest, l.descriptor.size)
            for l in image.layers}
    unique = {l.descriptor.digest: l for l in image.layers}
    staging = remote = cache = None
    try:
        # 1. under the lock: recover what killed imports left, check, plan
        with DatasetLock(ds):
            _recover(ds)
            staging = Staging(ds)
            staging.adopt_dead({l.descriptor.hex for l in unique.values()})
            if _check_target(ds, layout_dir, image, name, relpath):
                return _notneeded(outcome, image)
            present = annex.keys_present(ds.path, (keys[d] for d in unique))
        missing = [l for d, l in unique.items() if keys[d] not in present]
        outcome.downloaded = [l.descriptor.digest for l in missing]
        outcome.reused = [d for d in unique if d not in outcome.downloaded]
        # 2. without it: downloads, into this import's own staging dir;
        #    meanwhile the registry remote is set up (its own lock)
        if any(l.url for l in image.layers):
            remote = _Background(_setup_remote, ds.path, RemoteSetupLock(ds))
        cache = _blob_cache(ds, missing)
        staged = _download_missing(missing, staging.path, jobs,
                                   image.description, cache)
        remote_uuid = remote.result() if remote else None
        # 3. under the lock again: what changed meanwhile, then commit
        with DatasetLock(ds):
            _recover(ds)
            if _check_target(ds, layout_dir, image, name, relpath):
                return _notneeded(outcome, image)
            _commit(ds, image, layout_dir, relpath, name, keys, staged,
                    remote_uuid)
    except (subprocess.CalledProcessError, CommandError, OSError) as exc:
        raise UdockerError("import into %s failed: %s" % (
            ds.path, annex.one_line(exc))) from None
    finally:
        if remote:
            remote.wait()       # no git-annex of ours outlives the import
        if staging is not None:
            staging.remove()
    outcome.message = "stored %s: %d layer(s) downloaded, %d reused" % (
        image.description, len(outcome.downloaded), len(outcome.reused))
    if cache is not None and cache.hits:
        outcome.message += " (%d of them from the blob cache)" % len(cache.hits)
    return outcome


def _notneeded(outcome, image):
    outcome.status = "notneeded"
    outcome.message = "image %s already stored (manifest %s)" % (
        image.description, image.manifest.digest)
    return outcome


def _recover(ds):
    """Undo the commit step of an import that was killed (lock held)."""
    journal = Journal.left_behind(ds)
    if journal is None:
        return
    lgr.warning("an earlier import into %s was interrupted in its commit step; "
                "undoing what it left", ds.path)
    journal.remove_stale_git_locks(ds)
    journal.undo(ds.path)
    ds.config.reload(force=True)


# --- checks -------------------------------------------------------------

def _container_image(ds, name):
    ds.config.reload()
    return ds.config.get("datalad.containers.%s.image" % name)


def _check_container_name(ds, name, relpath):
    existing = _container_image(ds, name)
    if existing and existing != relpath:
        raise UdockerError(
            "a container named %r is already registered for %s; choose "
            "another name with -n NAME or import to that path" % (name, existing))


def _check_target(ds, layout_dir, image, name, relpath):
    """Raise if the import cannot go to ``layout_dir``; True if it is there."""
    _check_container_name(ds, name, relpath)
    if _already_stored(ds, layout_dir, image, name, relpath):
        return True
    _check_clean(ds, layout_dir)
    return False


def _already_stored(ds, layout_dir, image, name, relpath):
    layout = OCILayout(layout_dir)
    if not layout.exists():
        return False
    try:
        desc = layout.manifest_descriptor()
    except UdockerError:
        return False
    return (desc.digest == image.manifest.digest
            and desc.annotations == image.annotations
            and _container_image(ds, name) == relpath
            and not _dirty(ds, layout_dir))


def _dirty(ds, layout_dir):
    # without git-annex's filter: git re-reads racily clean files of the
    # whole index (a dataset just created), and the layout holds JSON in git
    # and symlinks, which no filter touches (an unlocked layer whose stat
    # changed would show as modified: a refusal to import, never a loss)
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--",
         str(layout_dir)], cwd=ds.path, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
        env=annex.without_annex_filter())
    return bool(out.stdout.strip())


def _check_clean(ds, layout_dir):
    if _dirty(ds, layout_dir):
        raise UdockerError(
            "%s has uncommitted changes; save or discard them (datalad save / "
            "git checkout) before importing into it" % layout_dir)


# --- step 1: download ----------------------------------------------------

class _CachedFetch:
    """Registry layers fetched through the user's blob cache (see
    ``blobcache``): hardlinked from it where this repository's objects
    may share an inode, filled as they are downloaded."""

    def __init__(self, cache, may_link):
        self.cache, self.may_link = cache, may_link
        self.hits = []

    def __call__(self, layer, dest, progress):
        desc = layer.descriptor
        if not layer.url:          # an archive's layer: already local
            layer.fetch(dest, progress)
        elif self.cache.fetch(desc.digest, desc.size, dest, layer.fetch,
                              progress, self.may_link):
            self.hits.append(desc.digest)


def _blob_cache(ds, layers):
    """A :class:`_CachedFetch` for ``layers``, or None (no registry layer,
    or every blob cache turned off)."""
    from .blobcache import BlobCache
    if not any(l.url for l in layers):
        return None
    cache = BlobCache.configured(ds)
    return _CachedFetch(cache, annex.may_link_objects(ds.path)) if cache else None


def _download_missing(layers, staging, jobs, description, cache=None):
    """Fetch ``layers`` in parallel into ``staging``; return {digest: file}.

    Workers are daemon threads: on the first error or on Ctrl-C the main
    thread stops waiting at once (a worker sleeping in a retry back-off must
    not delay the interrupt), the others stop at their next chunk, and the
    caller removes ``staging``.
    """
    if not layers:
        return {}
    total = sum(l.descriptor.size for l in layers)
    pid = "udocker-import-%s" % id(staging)
    lock = threading.Lock()
    todo = list(layers)
    staged, errors = {}, []
    finished, cancelled = threading.Event(), threading.Event()
    log_progress(lgr.info, pid, "Downloading %d layer(s) of %s",
                 len(layers), description, total=total, label="Downloading",
                 unit=" Bytes")

    def progress(n):
        if cancelled.is_set():      # stop a worker at its next chunk
            raise UdockerError("download cancelled")
        with lock:
            log_progress(lgr.info, pid, "", update=n, increment=True,
                         noninteractive_level=5)

    def worker():
        while True:
            with lock:
                if errors or not todo:
                    return
                layer = todo.pop(0)
            dest = staging / layer.descriptor.hex
            try:
                if cache is not None:
                    cache(layer, str(dest), progress)
                else:
                    layer.fetch(str(dest), progress)
            except BaseException as exc:   # reported to the main thread
                with lock:
                    errors.append(exc)
                finished.set()
                return
            with lock:
                staged[layer.descriptor.digest] = dest
                if len(staged) == len(layers):
                    finished.set()

    try:
        for _ in range(min(max(1, jobs), len(layers))):
            threading.Thread(target=worker, daemon=True).start()
        while not finished.wait(0.2):
            pass
    finally:
        cancelled.set()
        log_progress(lgr.info, pid, "Downloaded %s", description)
    if errors:
        raise errors[0]
    return staged


# --- step 2: commit ------------------------------------------------------

def _commit(ds, image, layout_dir, relpath, name, keys, staged, remote_uuid):
    """Make the dataset hold the image, in one commit; lock held.

    Keys are recomputed here: another import may have added some since the
    downloads were planned.  Only keys absent now are this step's own, and
    only those can be dropped again by its rollback.

    Plumbing, not ``datalad save``: every path this step changes is known,
    so it stages exactly those and commits exactly those (``git commit --
    PATHS``: other staged changes of the user's stay staged, hooks run).
    """
    present = annex.keys_present(ds.path, set(keys.values()))
    lost = [d for d, k in keys.items() if k not in present and d not in staged]
    if lost:
        raise UdockerError("layer %s was removed from the annex during the "
                           "import; run the import again" % lost[0])
    new = {keys[d]: f for d, f in staged.items() if keys[d] not in present}
    journal = Journal.begin(ds, relpath, list(new))
    config_file = Path(ds.path) / CONFIG
    registering = None
    try:
        # URLs first, in the background: git-annex starts our special remote
        # to claim them, while the layout and the keys are put in place
        registering = _Background(_register_urls, ds, image, keys, remote_uuid)
        old_blobs = _layout_blob_files(layout_dir)
        written = write_json_files(layout_dir, image.manifest, image.config_raw,
                                   image.annotations)
        attrs = layout_dir / ".gitattributes"
        attrs.write_text(GITATTRIBUTES)
        written.append(attrs)
        # layer symlinks (staged by fromkey)
        fromkey = []
        wanted = {OCILayout(layout_dir).blob_path(d): k
                  for d, k in keys.items()}
        for p, key in wanted.items():
            if p.is_symlink() and os.readlink(p).endswith("/" + key):
                continue
            if p.exists() or p.is_symlink():
                p.unlink()
            fromkey.append("%s %s" % (key, p.relative_to(ds.path).as_posix()))
        # blobs of a previous image that the new one does not use
        keep = set(wanted) | set(written)
        removed = sorted(old_blobs - keep)
        for p in removed:
            p.unlink()
        if fromkey:
            annex.annex(ds.path, "fromkey", "--force", batch=fromkey)
        # layer contents into the annex, under their digest keys, verified
        # as they were downloaded: moved into place, not hashed again
        annex.store_verified(ds.path, new)
        local = annex.local_uuid(ds.path) if new else None
        annex.set_present(ds.path, [(k, local) for k in new]
                          + registering.result())
        ds.config.set("datalad.containers.%s.image" % name, relpath,
                      scope="branch", reload=False)
        ds.config.set("datalad.containers.%s.cmdexec" % name, config.CMDEXEC,
                      scope="branch", reload=True)
        # JSON and .datalad/config stay in git (annex.largefiles=nothing)
        annex.git(ds.path, "add", "--", *[str(p) for p in written + removed],
                  str(config_file), env=annex.without_annex_filter())
        _git_commit(ds, [relpath, CONFIG],
                    "[DATALAD] udocker-import %s\n\nmanifest %s"
                    % (image.description, image.manifest.digest))
    except BaseException:
        if registering is not None:
            registering.wait()      # no git-annex of ours runs during the undo
        try:
            journal.undo(ds.path)
        except Exception as exc:      # the next import retries the undo
            lgr.warning("could not undo the failed import yet (%s); the next "
                        "import into %s will", annex.one_line(exc), ds.path)
        ds.config.reload(force=True)
        raise
    journal.finish()


def _git_commit(ds, paths, message):
    """Commit ``paths`` (all staged) and nothing else; no commit if unchanged.

    When nothing else is staged, the index is committed as it is; else
    ``git commit -- PATHS`` leaves the user's other staged changes staged
    (at the price of git reading those paths again).
    """
    staged = subprocess.run(
        ["git", "diff-index", "--cached", "--name-only", "-z", "HEAD"],
        cwd=ds.path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    ours = [p.rstrip("/") for p in paths]
    names = [n for n in staged.stdout.split("\0") if n]
    mine = [n for n in names
            if any(n == p or n.startswith(p + "/") for p in ours)]
    if staged.returncode == 0 and not mine:
        return
    only = staged.returncode != 0 or len(mine) != len(names)
    # the index as it is: git re-reads no file into the commit, so git-annex's
    # filter need not start (it would, for racily clean entries such as the
    # JSON just added); with PATHS git reads those files again, filtered
    annex.git(ds.path, "commit", "-q", "-m", message,
              *(["--"] + paths if only else []),
              env=None if only else annex.without_annex_filter())


def _setup_remote(ds_path, lock):
    """Our registry special remote, initialised if need be; its UUID."""
    with lock:
        return annex.ensure_special_remote(ds_path, config.SPECIAL_REMOTE_NAME,
                                           config.SPECIAL_REMOTE_TYPE)


class _Background:
    """``func(*args)`` in a daemon thread; :meth:`result` waits for it
    (interruptibly) and returns its value or raises its exception."""

    def __init__(self, func, *args):
        self._done = threading.Event()
        self._value = self._error = None

        def run():
            try:
                self._value = func(*args)
            except BaseException as exc:    # handed to result()
                self._error = exc
            finally:
                self._done.set()
        threading.Thread(target=run, daemon=True).start()

    def wait(self):
        try:
            while not self._done.wait(0.2):
                pass
        except KeyboardInterrupt:       # a second Ctrl-C: stop waiting
            pass

    def result(self):
        while not self._done.wait(0.2):
            pass
        if self._error is not None:
            raise self._error
        return self._value


def _register_urls(ds, image, keys, uuid):
    """Register the layers' blob URLs (claimed by our special remote, with
    UUID ``uuid``); return the (key, uuid) pairs to record as present."""
    with_url = [l for l in image.layers if l.url]
    if not with_url:
        return []
    lines = sorted({"%s %s" % (keys[l.descriptor.digest], l.url) for l in with_url})
    annex.annex(ds.path, "registerurl", batch=lines)
    return [(keys[l.descriptor.digest], uuid) for l in with_url]


def _layout_blob_files(layout_dir):
    blobs = layout_dir / "blobs" / "sha256"
    return set(blobs.iterdir()) if blobs.is_dir() else set()
