"""Read images from an OCI distribution registry: manifests, configs, blobs.

:class:`RegistryClient` resolves a reference to one platform's manifest
(verifying every byte against its digest) and streams layer blobs to disk
with on-the-fly verification and ``Range`` resume.  All HTTP concerns
(authentication, retries, redirects) live in :mod:`.transport`.

Blob URLs (``{scheme}://{host}/v2/{repository}/blobs/{digest}``) are what an
import registers in git-annex; :func:`parse_blob_url` and
:meth:`RegistryClient.for_url` turn one back into a client and a token scope.
"""
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import requests
import urllib3

from .. import oci
from ..digest import (CHUNK, DIGEST_RE, Hasher, VerifyingWriter, check_digest,
                      check_hashed, sha256_digest)
from ..errors import (DigestMismatch, NotFoundError, PlatformNotFound,
                      UdockerError, UnsupportedMediaType)
from ..reference import DOCKER_HUB, DOCKER_HUB_API, Reference, is_loopback_host
from . import credentials as _credentials
from .transport import Transport
from .urls import parse_blob_url, redact_url  # noqa: F401 (re-export)

lgr = logging.getLogger("datalad.udocker.registry.client")

MAX_MANIFEST_BYTES = 4 << 20
MAX_SMALL_BLOB_BYTES = 16 << 20
_LOOKUP = object()   # "credentials not given": look them up
# failures while a response body streams in (after the headers arrived)
_STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                  ConnectionError, TimeoutError)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ResolvedImage:
    """What a tag or digest points to, narrowed to one platform.

    ``top`` is the manifest or index as served for the reference,
    ``manifest`` the chosen platform's image manifest, ``platform`` the
    index entry's platform (None when the reference is a single manifest)
    and ``config_raw`` the verified config blob.
    """

    top: Union[oci.Manifest, oci.Index]
    manifest: oci.Manifest
    platform: Optional[oci.Platform]
    config_raw: bytes


def pull_scope(repository):
    return "repository:%s:pull" % repository


def _read_limited(resp, limit, what, error=UdockerError):
    """The body of ``resp``, refusing (with ``error``) more than ``limit`` bytes."""
    with resp:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise error("%s is %s bytes, more than the %d accepted"
                        % (what, declared, limit))
        data = bytearray()
        for chunk in resp.iter_content(CHUNK):
            data += chunk
            if len(data) > limit:
                raise error("%s is larger than the %d bytes accepted"
                            % (what, limit))
        return bytes(data)


class RegistryClient:
    """A reader for one registry (``registry_host`` as in a reference).

    Plain http is used for loopback hosts and hosts listed in
    ``insecure_registries``, https otherwise.  ``credentials`` defaults to
    :func:`.credentials.lookup` for the host; pass None for anonymous
    access.  ``retries``, ``backoff`` and ``max_wait`` tune
    :class:`.transport.Transport`.
    """

    def __init__(self, registry_host, insecure_registries: Iterable[str] = (),
                 credentials=_LOOKUP, retries=5, backoff=0.5, max_wait=30.0,
                 timeout=(15.0, 120.0), give_up_after=300.0):
        self.registry = registry_host
        self.api_host = (DOCKER_HUB_API if registry_host == DOCKER_HUB
                         else registry_host)
        insecure = set(insecure_registries or ())
        plain = (is_loopback_host(self.api_host) or registry_host in insecure
                 or self.api_host in insecure)
        self.scheme = "http" if plain else "https"
        self.base_url = "%s://%s" % (self.scheme, self.api_host)
        if credentials is _LOOKUP:
            credentials = _credentials.lookup(registry_host)
        self.retries, self.backoff = retries, backoff
        self.transport = Transport(self.base_url, credentials, retries=retries,
                                   backoff=backoff, max_wait=max_wait,
                                   timeout=timeout,
                                   give_up_after=give_up_after)

    @classmethod
    def for_url(cls, url, insecure_registries: Iterable[str] = (), **kwargs):
        """A client for the registry a blob URL points to."""
        base_url, _, _ = parse_blob_url(url)
        return cls(base_url.split("://", 1)[1], insecure_registries, **kwargs)

    def __repr__(self):
        return "RegistryClient(%s)" % self.base_url

    # -- URLs -----------------------------------------------------------
    def blob_url(self, repository, digest) -> str:
        return "%s/v2/%s/blobs/%s" % (self.base_url, repository,
                                      check_digest(digest))

    def manifest_url(self, repository, reference) -> str:
        return "%s/v2/%s/manifests/%s" % (self.base_url, repository, reference)

    def _check_url(self, url):
        base_url, repository, digest = parse_blob_url(url)
        if base_url != self.base_url:
            raise UdockerError(
                "blob URL %s is not on registry %s (an http URL for a remote "
                "host needs it in datalad.udocker.insecure-registries)"
                % (redact_url(url), self.base_url))
        return repository, digest

    # -- manifests ------------------------------------------------------
    def get_manifest(self, repository, reference, expected_digest=None
                     ) -> Union[oci.Manifest, oci.Index]:
        """The manifest or index ``reference`` (tag or digest) names, verified.

        The bytes are checked against ``expected_digest``, the reference
        itself when it is a digest, and the ``Docker-Content-Digest`` header.
        A body cut short is fetched again (the budget of
        :class:`.transport.Attempts`).
        """
        if reference.startswith("sha256:") or expected_digest:
            check_digest(expected_digest or reference, "manifest digest")
        url = self.manifest_url(repository, reference)
        what = "%s/%s:%s" % (self.registry, repository, reference)
        attempts = self.transport.attempts(url, "manifest " + what)
        while True:
            try:
                resp = self.transport.request(
                    "GET", url, headers={"Accept": oci.ACCEPT},
                    scope=pull_scope(repository), stream=True,
                    attempts=attempts)
            except NotFoundError as exc:
                raise NotFoundError(
                    "image %s not found (%s); check the image name and tag"
                    % (what, ", ".join(exc.codes) or "HTTP %s" % exc.status),
                    status=exc.status, codes=exc.codes, url=exc.url) from None
            declared = resp.headers.get("Content-Type", "").split(";")[0].strip()
            served = resp.headers.get("Docker-Content-Digest", "")
            try:
                raw = _read_limited(resp, MAX_MANIFEST_BYTES, "manifest " + what)
                break
            except _STREAM_ERRORS as exc:
                attempts.retry("body cut short (%s)" % type(exc).__name__)
        actual = sha256_digest(raw)
        for expected in (expected_digest,
                         reference if reference.startswith("sha256:") else None,
                         served if DIGEST_RE.match(served) else None):
            if expected and expected != actual:
                raise DigestMismatch(
                    "manifest %s has digest %s, expected %s; the registry or "
                    "a proxy served wrong bytes" % (what, actual, expected))
        return oci.parse_manifest(raw, declared or None)

    def resolve(self, ref: Reference, platform: Optional[oci.Platform] = None
                ) -> ResolvedImage:
        """Resolve ``ref`` to one platform's manifest and its verified config.

        An index is narrowed to ``platform`` (default: this host's); a single
        manifest must match an explicitly requested platform.
        """
        repo = ref.repository
        try:
            top = self.get_manifest(repo, ref.reference,
                                    expected_digest=ref.digest)
        except NotFoundError as exc:
            raise self._not_found(ref, exc) from None
        chosen = None
        if isinstance(top, oci.Index):
            entry = top.select(platform or oci.host_platform())
            manifest = self.get_manifest(repo, entry.digest,
                                         expected_digest=entry.digest)
            if not isinstance(manifest, oci.Manifest):
                raise UnsupportedMediaType(
                    "index %s points to another index for %s: nested indexes "
                    "are not supported" % (ref, entry.platform))
            chosen = entry.platform
        else:
            manifest = top
        config_raw = self.get_blob_bytes(repo, manifest.config)
        config = oci.parse_config(config_raw, "image config of %s" % ref)
        if chosen is None and platform is not None:
            self._check_single_platform(ref, platform, config.platform)
        oci.check_layers_supported(manifest)
        return ResolvedImage(top, manifest, chosen, config_raw)

    def list_tags(self, repository, limit=100):
        """Up to ``limit`` tags of ``repository``, as the registry's
        ``tags/list`` answers (NotFoundError: no such repository)."""
        url = "%s/v2/%s/tags/list?n=%d" % (self.base_url, repository, limit)
        resp = self.transport.request("GET", url, scope=pull_scope(repository),
                                      stream=True)
        raw = _read_limited(resp, MAX_MANIFEST_BYTES, "tag list of %s"
                            % repository)
        try:
            tags = json.loads(raw).get("tags") or []
            return [str(t) for t in tags][:limit]
        except (ValueError, AttributeError, TypeError):
            raise UdockerError("registry %s sent a malformed tag list for %s"
                               % (self.registry, repository)) from None

    def _not_found(self, ref, exc):
        """A NotFoundError for ``ref`` saying what is missing: the tag (or
        digest) of a repository the registry lists tags for, or the
        repository itself."""
        repo = "%s/%s" % (self.registry, ref.repository)
        try:
            tags = sorted(self.list_tags(ref.repository))
        except NotFoundError:
            msg = ("repository %s not found (%s); check the image name"
                   % (repo, ", ".join(exc.codes) or "HTTP %s" % exc.status))
        except UdockerError:
            msg = str(exc)       # tags unknown: get_manifest's own words
        else:
            shown = ", ".join(tags[:10]) + (
                " and more" if len(tags) > 10 else "") or "none"
            what = ("manifest %s" % ref.digest if ref.digest
                    else "tag %r" % ref.reference)
            msg = "%s has no %s; its tags: %s" % (repo, what, shown)
        return NotFoundError(msg, status=exc.status, codes=exc.codes,
                             url=exc.url)

    @staticmethod
    def _check_single_platform(ref, wanted, have):
        if not wanted.matches(have):
            raise PlatformNotFound(
                "no image for platform %s; %s is a single-platform image for "
                "%s (drop --platform or choose %s)" % (wanted, ref, have, have))

    # -- blobs ----------------------------------------------------------
    def get_blob_bytes(self, repository, descriptor: oci.Descriptor) -> bytes:
        """A small blob (e.g. an image config) in memory, verified.

        Fetched like a layer (:meth:`_download`): retried, resumed with
        ``Range`` after a drop, verified before it is returned.
        """
        if descriptor.size > MAX_SMALL_BLOB_BYTES:
            raise UdockerError(
                "blob %s is %d bytes, too large to hold in memory (limit %d)"
                % (descriptor.digest, descriptor.size, MAX_SMALL_BLOB_BYTES))
        writer = VerifyingWriter(None, descriptor.digest, descriptor.size)
        self._download(self.blob_url(repository, descriptor.digest),
                       repository, writer, None)
        return writer.getvalue()

    def blob_exists(self, url) -> bool:
        """Does the registry have the blob at ``url`` (a HEAD request)?"""
        repository, _ = self._check_url(url)
        try:
            resp = self.transport.request("HEAD", url,
                                          scope=pull_scope(repository))
        except NotFoundError:
            return False
        resp.close()
        return True

    def download_blob(self, url, digest, size, dest_path,
                      progress: Optional[Progress] = None, parts=1) -> None:
        """Stream the blob at ``url`` into ``dest_path``, verified.

        Bytes are hashed as they arrive (~1 MiB at a time).  An existing
        partial ``dest_path`` is resumed with ``Range: bytes=N-``, and so is
        a connection dropped mid-body; a server that answers 200 to a Range
        request is read from the start again.  On DigestMismatch the file is
        deleted (after one fresh attempt if a pre-existing partial file was
        resumed).  ``progress(n)`` is called with each count of new bytes
        (bytes found in a partial file are reported once, at the start).

        ``parts`` > 1: a new download of a large blob is fetched as that many
        byte ranges at once (see :meth:`_download_parts`), still hashed once,
        in order, before it counts as downloaded.
        """
        repository, url_digest = self._check_url(url)
        if url_digest != check_digest(digest):
            raise UdockerError("blob URL %s does not name digest %s"
                               % (redact_url(url), digest))
        _keep_hashed_prefix(dest_path)
        resumed = os.path.exists(dest_path) and os.path.getsize(dest_path) > 0
        parts = 1 if resumed else min(parts, size // PART_MIN)

        def fetch(progress):
            if parts > 1:
                try:
                    return self._download_parts(url, repository, digest, size,
                                                dest_path, parts, progress)
                except _NoRanges:
                    lgr.debug("%s ignores Range requests: one stream",
                              redact_url(url))
                    _unlink(dest_path)
            with VerifyingWriter(dest_path, digest, size) as writer:
                self._download(url, repository, writer, progress)
        try:
            fetch(progress)
        except DigestMismatch:
            _unlink(dest_path)
            if not resumed:
                raise
            lgr.debug("resumed download of %s failed verification; "
                      "starting over", digest)
            try:
                fetch(None)
            except DigestMismatch:
                _unlink(dest_path)
                raise

    def _download(self, url, repository, writer, progress, span=None):
        """Fill ``writer`` (a VerifyingWriter) with the blob at ``url``.

        Retries lost connections, truncated bodies, 5xx and 429 on one
        :class:`.transport.Attempts` budget (progress renews it), resuming
        with ``Range`` from what ``writer`` holds; verifies at the end.
        With ``span`` (first byte, end), ``writer`` takes only those bytes
        of the blob and every request asks for them by ``Range``.
        """
        reported = 0
        offset, end = span or (0, None)

        def report(written):
            nonlocal reported
            if progress is not None and written > reported:
                progress(written - reported)
            reported = max(reported, written)

        attempts = self.transport.attempts(url, "blob " + writer.digest)
        report(writer.written)
        while writer.written < writer.size:
            start = offset + writer.written
            headers = {"Accept-Encoding": "identity"}
            if span:
                headers["Range"] = "bytes=%d-%d" % (start, end - 1)
            elif start:
                headers["Range"] = "bytes=%d-" % start
            resp = self.transport.request("GET", url, headers=headers,
                                          scope=pull_scope(repository),
                                          stream=True, attempts=attempts)
            try:
                if "Range" in headers and not _continues_at(resp, start):
                    lgr.debug("%s ignored Range (HTTP %d), restarting at 0",
                              redact_url(url), resp.status_code)
                    writer.reset()
                    if resp.status_code != 200:
                        attempts.retry("a range we did not ask for")
                        continue
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    writer.write(chunk)
                    report(writer.written)
            except _STREAM_ERRORS as exc:
                if offset + writer.written > start:
                    attempts.progressed()
                attempts.retry("interrupted at %d bytes (%s)"
                               % (writer.written, type(exc).__name__))
                continue
            finally:
                resp.close()
            if offset + writer.written == start:
                break        # a clean, empty answer: verify() says what is wrong
            if writer.written < writer.size:
                attempts.progressed()
                attempts.retry("body ended at %d of %d bytes"
                               % (writer.written, writer.size))
        writer.verify()

    def _download_parts(self, url, repository, digest, size, dest_path, parts,
                        progress):
        """Fetch the blob as ``parts`` byte ranges at once into a new
        ``dest_path``, each in its own thread and connection (with the retries
        of :meth:`_download`); this thread hashes the file in order as the
        ranges fill it, so the verdict is the same as for one stream.

        Raises _NoRanges if the server does not serve ranges, DigestMismatch
        as :class:`.digest.VerifyingWriter` does, or the first error of a
        range; then no range thread writes to the file any more, and the
        file holds just the bytes hashed so far (a resume continues there).
        """
        bounds = [size * i // parts for i in range(parts + 1)]
        shared = _PartsState(parts)
        # until the end, the file is not a prefix of the blob (ranges land
        # beyond holes): the side file says how much of it is, for a
        # resume after a kill (see _keep_hashed_prefix)
        hashed_fd = os.open(dest_path + _HASHED, os.O_WRONLY | os.O_CREAT
                            | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        open(dest_path, "wb").close()
        writers = [_PartWriter(dest_path, digest, bounds[i], bounds[i + 1],
                               i, shared) for i in range(parts)]

        def run(writer):
            try:
                self._download(url, repository, writer, None,
                               span=(writer.start, writer.end))
            except BaseException as exc:     # handed to the hashing thread
                shared.fail(exc)
            finally:
                writer.stop()
        threads = [threading.Thread(target=run, args=(w,), daemon=True)
                   for w in writers]
        for t in threads:
            t.start()
        hasher = Hasher()
        fd = os.open(dest_path, os.O_RDONLY)
        try:
            for w in writers:
                while hasher.count < w.end:
                    have = w.start + shared.wait(w.index, hasher.count - w.start)
                    while hasher.count < have:
                        chunk = os.pread(fd, min(CHUNK, have - hasher.count),
                                         hasher.count)
                        if not chunk:
                            raise DigestMismatch(
                                "blob %s: %s shrank while it was downloaded"
                                % (digest, dest_path))
                        hasher.update(chunk)
                        os.pwrite(hashed_fd, b"%20d" % hasher.count, 0)
                        if progress is not None:
                            progress(len(chunk))
        except BaseException:
            for w in writers:
                w.stop()
            try:
                os.truncate(dest_path, hasher.count)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
            os.close(hashed_fd)
            _unlink(dest_path + _HASHED)
        for t in threads:
            t.join()
        check_hashed(hasher, digest, size)


#: the smallest range :meth:`RegistryClient.download_blob` fetches on its own
#: connection: below it, a range costs more in requests than it gains
PART_MIN = 16 << 20


#: beside a file being filled by ranges: how many of its first bytes are the
#: blob's (hashed), as 20 ASCII digits
_HASHED = ".hashed"


def _keep_hashed_prefix(dest_path):
    """A file left by ranges whose process was killed holds bytes beyond
    holes: cut it to the prefix its side file vouches for (none if that is
    unreadable), so that a resume does not take it all as the blob's."""
    side = dest_path + _HASHED
    try:
        with open(side, "rb") as f:
            text = f.read(64)
    except FileNotFoundError:
        return
    try:
        keep = int(text.strip() or 0)
    except ValueError:
        keep = 0
    try:
        if os.path.getsize(dest_path) > keep:
            os.truncate(dest_path, max(keep, 0))
    except FileNotFoundError:
        pass
    _unlink(side)


class _NoRanges(Exception):
    """The server answered a range request with the whole blob."""


class _Cancelled(Exception):
    """The hashing thread gave up on this blob (:meth:`_PartWriter.stop`)."""


class _PartsState:
    """How far each range of one blob is written, for the thread that
    hashes it, and the first error of a range."""

    def __init__(self, parts):
        self.done = [0] * parts
        self.error = None
        self.cond = threading.Condition()

    def wrote(self, index, count):
        with self.cond:
            self.done[index] = count
            self.cond.notify_all()

    def fail(self, exc):
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def wait(self, index, beyond):
        """Wait until range ``index`` holds more than ``beyond`` bytes;
        return how many it holds, or raise the first error of a range."""
        with self.cond:
            while self.done[index] <= beyond and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            return self.done[index]


class _PartWriter:
    """Bytes [start, end) of a blob, written in place into the file through
    its own descriptor, for :meth:`RegistryClient._download` with a span."""

    def __init__(self, path, digest, start, end, index, shared):
        self.digest, self.start, self.end = digest, start, end
        self.size, self.written = end - start, 0
        self.index, self.shared = index, shared
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, data):
        if self.written + len(data) > self.size:
            raise DigestMismatch(
                "the registry sent more than the %d bytes asked for at offset "
                "%d of blob %s" % (self.size, self.start, self.digest))
        with self.lock:
            if self.fd is None:
                raise _Cancelled()
            os.pwrite(self.fd, data, self.start + self.written)
        self.written += len(data)
        self.shared.wrote(self.index, self.written)

    def stop(self):
        """Close the descriptor once no write is under way: after this,
        nothing is written (a write in progress has finished)."""
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def reset(self):
        raise _NoRanges()

    def verify(self):
        """Complete, as the caller's loop saw to; the digest is the hashing
        thread's to check."""


def _continues_at(resp, start):
    """Does this response carry the bytes from offset ``start`` on?"""
    if resp.status_code != 206:
        return False
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return bool(m) and int(m.group(1)) == start


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
