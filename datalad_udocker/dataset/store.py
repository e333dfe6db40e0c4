"""Put an image into a dataset: OCI layout JSON in git, layers in git-annex.

This is where a layer byte goes (read top to bottom):

1. ``_download_missing``: each layer not yet in the local annex is fetched by
   its source (registry, archive) into a staging file under
   ``.git/annex/tmp``, hashed on the fly; a wrong digest never gets further.
2. ``_commit``: only when every layer is verified does the dataset change:
   each staged file becomes the content of the git-annex key
   ``SHA256-s<size>--<hex>`` (= its registry digest, no re-hashing), the
   layout's ``blobs/sha256/<hex>`` becomes a symlink to that key, its
   registry URL is registered (claimed by our special remote, which is
   marked as having it), the JSON goes to git, datalad-container learns the
   image, and one ``datalad save`` records it all.

Any failure or interrupt before the save leaves the dataset as it was.
"""
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from datalad.log import log_progress

from . import annex
from .. import config
from ..digest import annex_key
from ..errors import UdockerError
from .layout import OCILayout, write_json_files

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
    _check_container_name(ds, name, relpath)
    outcome = StoreOutcome("ok", str(layout_dir), name, image.manifest.digest)
    if _already_stored(ds, layout_dir, image, name, relpath):
        outcome.status = "notneeded"
        outcome.message = "image %s already stored (manifest %s)" % (
            image.description, image.manifest.digest)
        return outcome
    _check_clean(ds, layout_dir)

    keys = {l.descriptor.digest: annex_key(l.descriptor.digest, l.descriptor.size)
            for l in image.layers}
    unique = {l.descriptor.digest: l for l in image.layers}
    present = annex.keys_present(ds.path, (keys[d] for d in unique))
    missing = [l for d, l in unique.items() if keys[d] not in present]
    outcome.downloaded = [l.descriptor.digest for l in missing]
    outcome.reused = [d for d in unique if d not in outcome.downloaded]

    tmp_root = Path(ds.repo.dot_git) / "annex" / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="datalad-udocker-", dir=tmp_root))
    try:
        staged = _download_missing(missing, staging, jobs, image.description)
        _commit(ds, image, layout_dir, relpath, name, keys, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outcome.message = "stored %s: %d layer(s) downloaded, %d reused" % (
        image.description, len(outcome.downloaded), len(outcome.reused))
    return outcome


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
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--",
         str(layout_dir)], cwd=ds.path, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    return bool(out.stdout.strip())


def _check_clean(ds, layout_dir):
    if _dirty(ds, layout_dir):
        raise UdockerError(
            "%s has uncommitted changes; save or discard them (datalad save / "
            "git checkout) before importing into it" % layout_dir)


# --- step 1: download ----------------------------------------------------

def _download_missing(layers, staging, jobs, description):
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

def _commit(ds, image, layout_dir, relpath, name, keys, staged):
    backup = _Backup(ds, layout_dir)
    new_keys = []
    try:
        # layer contents into the annex, under their digest keys
        for digest, tmpfile in staged.items():
            annex.set_key_content(ds.path, keys[digest], str(tmpfile))
            new_keys.append(keys[digest])
        old_blobs = _layout_blob_files(layout_dir)
        written = write_json_files(layout_dir, image.manifest, image.config_raw,
                                   image.annotations)
        attrs = layout_dir / ".gitattributes"
        attrs.write_text(GITATTRIBUTES)
        written.append(attrs)
        # layer symlinks
        fromkey = []
        wanted = {layout_dir / "blobs" / "sha256" / d.split(":", 1)[1]: k
                  for d, k in keys.items()}
        for p, key in wanted.items():
            if p.is_symlink() and os.readlink(p).endswith("/" + key):
                continue
            if p.exists() or p.is_symlink():
                p.unlink()
            fromkey.append("%s %s" % (key, p.relative_to(ds.path).as_posix()))
        # blobs of a previous image that the new one does not use
        keep = set(wanted) | set(written)
        for p in old_blobs - keep:
            p.unlink()
        if fromkey:
            annex.annex(ds.path, "fromkey", "--force", batch=fromkey)
        _register_urls(ds, image, keys)
        subprocess.run(["git", "add", "--"] + [str(p) for p in written],
                       cwd=ds.path, check=True, stdout=subprocess.DEVNULL)
        ds.config.set("datalad.containers.%s.image" % name, relpath,
                      scope="branch", reload=False)
        ds.config.set("datalad.containers.%s.cmdexec" % name, config.CMDEXEC,
                      scope="branch", reload=True)
        res = ds.save(path=[str(layout_dir), str(Path(ds.path) / ".datalad" / "config")],
                      message="[DATALAD] udocker-import %s\n\nmanifest %s"
                      % (image.description, image.manifest.digest),
                      result_renderer="disabled", on_failure="ignore",
                      return_type="list")
        failed = [r for r in res if r.get("status") not in ("ok", "notneeded")]
        if failed:
            raise UdockerError("datalad save failed: %s" % failed[0].get("message"))
    except BaseException:
        backup.restore()
        for key in new_keys:
            annex.drop_key(ds.path, key)
        raise


def _register_urls(ds, image, keys):
    with_url = [l for l in image.layers if l.url]
    if not with_url:
        return
    uuid = annex.ensure_special_remote(ds.path, config.SPECIAL_REMOTE_NAME,
                                       config.SPECIAL_REMOTE_TYPE)
    lines = sorted({"%s %s" % (keys[l.descriptor.digest], l.url) for l in with_url})
    annex.annex(ds.path, "registerurl", batch=lines)
    annex.annex(ds.path, "setpresentkey",
                batch=sorted({"%s %s 1" % (keys[l.descriptor.digest], uuid)
                              for l in with_url}))


def _layout_blob_files(layout_dir):
    blobs = layout_dir / "blobs" / "sha256"
    return set(blobs.iterdir()) if blobs.is_dir() else set()


class _Backup:
    """Enough state to put the layout dir and .datalad/config back."""

    def __init__(self, ds, layout_dir):
        self.ds, self.layout_dir = ds, layout_dir
        self.existed = layout_dir.exists()
        self.cfg = Path(ds.path) / ".datalad" / "config"
        self.cfg_bytes = self.cfg.read_bytes() if self.cfg.exists() else None

    def restore(self):
        git = ["git", "-C", self.ds.path]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(git + ["reset", "-q", "--", str(self.layout_dir)], **quiet)
        if self.existed:
            subprocess.run(git + ["checkout", "--", str(self.layout_dir)], **quiet)
            subprocess.run(git + ["clean", "-fdq", "--", str(self.layout_dir)], **quiet)
        else:
            shutil.rmtree(self.layout_dir, ignore_errors=True)
            try:
                os.removedirs(self.layout_dir.parent)   # empty parents only
            except OSError:
                pass
        if self.cfg_bytes is None:
            if self.cfg.exists():
                self.cfg.unlink()
        else:
            self.cfg.write_bytes(self.cfg_bytes)
        subprocess.run(git + ["reset", "-q", "--", str(self.cfg)], **quiet)
        self.ds.config.reload(force=True)
