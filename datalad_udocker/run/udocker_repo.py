"""Feed an image stored as an OCI layout into udocker's local repository.

udocker keeps pulled images in ``$UDOCKER_DIR/repos/<name>/<tag>/``: a file
``TAG``, an empty marker ``v2``, the image manifest as ``manifest`` and one
symlink ``sha256:<hex>`` per blob (the config and every layer).  ``udocker
create`` reads the layer order and the config from that manifest and
extracts the layers the symlinks point to.  This module writes exactly that
layout, with the symlinks pointing at the blobs of the OCI layout (in a
dataset: the annexed layer files), so no layer is ever copied and no
``udocker pull`` or ``udocker load`` is needed.

An image is fed under the repository name ``datalad-udocker/<manifest hex>``
and tag ``latest``: a changed image (new manifest digest) is a new repository
entry, and two datasets holding the same image share it.

Digest verification
-------------------
``udocker create`` does not verify digests, so every blob is verified here
before it is fed: a corrupt layer raises :class:`~.errors.DigestMismatch` and
nothing is fed.  Feeding only happens when a container has to be created
(once per image and execution mode, see :mod:`.runtime`), so the hash pass
runs once next to the much slower extraction.  To keep the second execution
mode (or a re-creation after a prune) from hashing again, a blob that passed
is remembered under ``datalad-udocker/verified/<hex>`` together with the
device, inode, size, mtime and ctime of the file that was hashed; a file
that was replaced, written or touched since is hashed again (ctime: even if
its mtime was put back).  ``udocker-export`` trusts the same memo.  git-annex objects are
write-protected and never change in place, so this memo is sound for them.

Layer safety
------------
``udocker create`` extracts the layers with GNU tar and applies whiteouts itself, which a
hostile stack of layers can use to write or delete outside the container.  Before an image
is fed for the first time its layers are checked as a whole stack, in manifest order, by
:mod:`.layer_check`, in the same read that hashes them: an unsafe image raises
:class:`~.errors.UnsafeLayer` and nothing is fed.  Since the blobs are verified against the
manifest, a stack that passed is remembered under ``datalad-udocker/checked/<manifest hex>``
(with the checker's version) and a second execution mode does not read the layers again.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..digest import Digest, HashingReader, file_digest, hex_part
from ..errors import DigestMismatch, InvalidDigest, LayoutError, UnsafeLayer
from .layer_check import CHECKER_VERSION, StackChecker
from .safe_delete import remove_tree

REPO_PREFIX = "datalad-udocker"
TAG = "latest"
STATE_DIR = "datalad-udocker"     # our own bookkeeping inside the udocker dir


@dataclass(frozen=True)
class FedImage:
    """An image present in udocker's repository: ``udocker create`` takes :attr:`spec`."""
    repo: str
    tag: str
    tag_dir: Path
    manifest_digest: str

    @property
    def spec(self):
        return "%s:%s" % (self.repo, self.tag)


def repo_name(manifest_digest):
    """udocker repository name for the image with this manifest digest."""
    return "%s/%s" % (REPO_PREFIX, hex_part(manifest_digest))


def repo_digest(name):
    """The manifest digest a udocker repository name (``repo`` or
    ``repo:tag``) made by :func:`repo_name` stands for, else None."""
    if not name.startswith(REPO_PREFIX + "/"):
        return None
    try:
        return Digest("sha256:" + name[len(REPO_PREFIX) + 1:].partition(":")[0])
    except InvalidDigest:
        return None


class UdockerRepo:
    """udocker's ``repos/`` directory under ``udocker_dir``, fed from OCI layouts."""

    def __init__(self, udocker_dir):
        self.udocker_dir = Path(udocker_dir)
        self.repos_dir = self.udocker_dir / "repos"
        self.verified_dir = self.udocker_dir / STATE_DIR / "verified"
        self.checked_dir = self.udocker_dir / STATE_DIR / "checked"

    def tag_dir(self, manifest_digest):
        return self.repos_dir / repo_name(manifest_digest) / TAG

    def is_fed(self, manifest_digest):
        tag_dir = self.tag_dir(manifest_digest)
        return (tag_dir / "TAG").is_file() and (tag_dir / "manifest").is_file()

    def feed(self, layout):
        """Verify the layout's blobs, check its layers, (re)write its tag directory.

        Returns a :class:`FedImage`.  Raises LayoutError if a blob is not
        present (not fetched), DigestMismatch if one is corrupt and
        UnsafeLayer if the layers would escape the container; in all
        cases nothing is written.  The caller serialises feeds of the same
        image (the runtime holds a per-image lock).
        """
        manifest = layout.manifest()
        blobs = (manifest.config,) + tuple(manifest.layers)
        targets = {}
        for desc in blobs:
            path = layout.blob_path(desc.digest)
            if not path.exists():
                raise LayoutError(
                    "layer %s of the image in %s is not present: fetch it "
                    "with `datalad get %s`" % (desc.digest, layout.path,
                                               layout.path))
            targets[desc.digest] = os.path.realpath(path)
        self.verify_blob(layout.blob_path(manifest.config.digest),
                         manifest.config.digest, manifest.config.size)
        if self.is_checked(manifest.digest):
            for desc in manifest.layers:
                self.verify_blob(layout.blob_path(desc.digest), desc.digest,
                                 desc.size)
        else:
            checker = StackChecker()
            for desc in manifest.layers:
                self.verify_blob(layout.blob_path(desc.digest), desc.digest,
                                 desc.size, checker)
            self._remember(self.checked_dir / manifest.digest.hex,
                           {"checker": CHECKER_VERSION})
        final = self.tag_dir(manifest.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".feed-", dir=final.parent))
        try:
            (staging / "TAG").write_text("%s/%s:%s" % (
                self.repos_dir, repo_name(manifest.digest), TAG))
            (staging / "v2").touch()
            (staging / "manifest").write_bytes(manifest.raw)
            for name, target in targets.items():
                os.symlink(target, staging / name)
            if final.exists():
                shutil.rmtree(final)     # symlinks and small files only
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return FedImage(repo_name(manifest.digest), TAG, final,
                        manifest.digest)

    def remove(self, manifest_digest):
        """Forget a fed image (its symlinks; the blobs are not touched)."""
        remove_tree(self.tag_dir(manifest_digest).parent,
                    self.repos_dir / REPO_PREFIX)

    def fed_digests(self):
        """Manifest digests of every image fed by this package."""
        base = self.repos_dir / REPO_PREFIX
        if not base.is_dir():
            return []
        found = (repo_digest("%s/%s" % (REPO_PREFIX, p.name))
                 for p in base.iterdir() if (p / TAG / "TAG").is_file())
        return sorted(d for d in found if d is not None)

    # --- verification ----------------------------------------------------
    def verify_blob(self, path, digest, size, checker=None):
        """Raise DigestMismatch unless ``path`` holds ``size`` bytes hashing
        to ``digest``; a previous success on the unchanged file is reused.

        With a ``checker`` (a :class:`.layer_check.StackChecker`) the blob is
        a layer: it is checked in the same read that hashes it (a corrupt
        blob is reported as such, before any UnsafeLayer).
        """
        st = os.stat(path)
        stamp = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                 "digest": digest}
        memo = self.verified_dir / Digest(digest).hex
        if checker is None:
            try:
                if json.loads(memo.read_text()) == stamp:
                    return
            except (OSError, ValueError):
                pass
        if st.st_size != size:
            raise DigestMismatch(
                "layer %s is corrupt (%d bytes, the manifest says %d): "
                "re-fetch it with `datalad get`" % (digest, st.st_size, size))
        if checker is None:
            got = file_digest(path)
        else:
            got, unsafe = _hash_and_check(path, digest, checker)
        if got != digest:
            raise DigestMismatch(
                "layer %s is corrupt (its content hashes to %s): re-fetch it "
                "with `datalad get`" % (digest, got))
        if checker is not None and unsafe is not None:
            raise unsafe
        self._remember(memo, stamp)

    def is_checked(self, manifest_digest):
        """Whether this image's layer stack passed :mod:`.layer_check`."""
        memo = self.checked_dir / hex_part(manifest_digest)
        try:
            return json.loads(memo.read_text()) == {"checker": CHECKER_VERSION}
        except (OSError, ValueError):
            return False

    @staticmethod
    def _remember(memo, doc):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(".%s.%d" % (memo.name, os.getpid()))
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, memo)

    def forget_verified(self, digest):
        try:
            (self.verified_dir / hex_part(digest)).unlink()
        except FileNotFoundError:
            pass


def _hash_and_check(path, digest, checker):
    """``(digest of the file, UnsafeLayer or None)`` from one read of ``path``."""
    unsafe = None
    with open(path, "rb") as f:
        reader = HashingReader(f)
        try:
            checker.check_layer(digest, reader)
        except UnsafeLayer as exc:
            unsafe = exc
        reader.drain()              # the rest the tar reader did not need
    return reader.digest, unsafe
