"""Shared pieces of the benchmarks: a registry with a large image, timing with peak memory.

Benchmarks compare datalad-udocker with skopeo, udocker and plain tools *in the same run*
on the same machine and print ratios; they assert nothing about absolute speed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fixtures import images as im  # noqa: E402
from fixtures.registry import Registry  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
os.environ.setdefault("UDOCKER_TARBALL", "")

_MEASURE = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "dt = time.perf_counter() - t\n"
            "sys.stderr.buffer.write(p.stderr[-3000:] if p.returncode else b'')\n"
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)\n")


def measure(cmd, cwd=None, env=None):
    """Run ``cmd`` (its output discarded); return (seconds, peak RSS of the largest process
    in MiB).  Exits with the command's stderr when it fails."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], cwd=cwd, env=env,
                          check=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seconds, rss_kib, rc = proc.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"benchmark command failed ({rc}): {' '.join(map(str, cmd))}\n"
                         f"{proc.stderr.strip()}")
    return float(seconds), int(rss_kib) / 1024


def random_layer(mib, seed):
    """An incompressible layer of ``mib`` MiB (one file), gzip-compressed like a real layer."""
    import random
    data = random.Random(seed).randbytes(mib << 20)
    return im.make_layer({f"data/blob-{seed}.bin": data})


def start_registry_with_image(layer_mib=(40, 40, 40), name="bench/big", tag="1"):
    """A plain registry with one busybox layer plus random layers; returns (registry, ref)."""
    reg = Registry("plain").start()
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    layers = [im.make_layer(im.busybox_rootfs())]
    layers += [random_layer(m, seed=i) for i, m in enumerate(layer_mib)]
    im.build_image(work / "layout", "src", layers, cmd=["/bin/sh"])
    reg.push(work / "layout", "src", name, tag)
    shutil.rmtree(work, ignore_errors=True)
    return reg, f"{reg.host}/{name}:{tag}", sum(len(l.data) for l in layers)


def table(rows, baseline):
    """Print rows of (name, seconds, rss MiB) with ratios to the ``baseline`` row."""
    base = dict((r[0], r) for r in rows)[baseline]
    print(f"{'tool':<44} {'seconds':>8} {'x ' + baseline:>16} {'peak MiB':>9} {'x mem':>7}")
    for name, sec, rss in rows:
        print(f"{name:<44} {sec:8.2f} {sec / base[1]:16.2f} {rss:9.1f} {rss / base[2]:7.2f}")


def git_identity_env():
    env = dict(os.environ)
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@example.org")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@example.org")
    return env


def imported_dataset(work, ref, env, name="big"):
    """A new dataset in ``work`` with ``ref`` imported as ``name``; returns (ds, layout)."""
    ds = Path(work) / "ds"
    subprocess.run(["datalad", "create", str(ds)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["datalad", "udocker-import", "-n", name, ref], cwd=ds, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return ds, ds / ".datalad" / "environments" / name / "image"


# -- images written blob by blob to disk (a 1 GiB image never sits in memory) -----------------
class BlobLayer:
    """A layer blob stored in a layout: what a manifest and a config need to know of it."""
    media_type = im.OCI_LAYER["gzip"]

    def __init__(self, digest, diff_id, size):
        self.digest, self.diff_id, self.size = digest, diff_id, size


def _sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def gzip_tar_into_layout(tar_path, layout, level=1):
    """Compress the tar at ``tar_path`` (then deleted) into ``layout``'s blobs; a BlobLayer."""
    layout = im.init_layout(layout)
    diff_id = _sha256_file(tar_path)
    tmp = Path(layout) / "blobs" / "tmp.gz"
    with open(tmp, "wb") as out:
        subprocess.run(["gzip", f"-{level}", "-n", "-c", str(tar_path)], stdout=out, check=True)
    os.unlink(tar_path)
    digest = _sha256_file(tmp)
    tmp.rename(Path(layout) / "blobs" / "sha256" / digest.split(":", 1)[1])
    return BlobLayer(digest, diff_id, os.path.getsize(Path(layout) / "blobs" / "sha256" /
                                                       digest.split(":", 1)[1]))


def write_layout(layout, layers, tag="src", **config_kw):
    """Write config, manifest and tag ``tag`` for blob ``layers`` already in ``layout``."""
    config = json.dumps(im.image_config(layers, **config_kw), sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": im.OCI_MANIFEST,
                "config": {"mediaType": im.OCI_CONFIG, "size": len(config),
                           "digest": im._put_blob(Path(layout), config)},
                "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size}
                           for l in layers]}
    data = json.dumps(manifest, indent=2).encode()
    im.tag(Path(layout), {"mediaType": im.OCI_MANIFEST, "size": len(data),
                          "digest": im._put_blob(Path(layout), data)}, tag)


class _Random:
    """A file-like object of ``size`` incompressible bytes."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def _tar_info(path, size=0, mode=0o644):
    import tarfile
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = size, mode, im.MTIME
    return info


class _Hashing:
    """A write-only file object that hashes what passes through to ``out``."""

    def __init__(self, out):
        import hashlib
        self.out, self.sha, self.pos = out, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.pos += len(data)
        return self.out.write(data)

    def tell(self):
        return self.pos

    def flush(self):
        self.out.flush()

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def random_image(layout, layer_mib):
    """One incompressible file per layer, ``layer_mib`` MiB each, on a busybox-less image.

    Each layer is written in one pass (tar -> gzip -> file, both hashed on the way); gzip
    stores the random bytes (level 0): the blob is a valid tar+gzip of the same size as
    compressing it would give, built without spending a minute of CPU on it.
    """
    import gzip
    import tarfile
    layout = im.init_layout(layout)
    layers = []
    for i, mib in enumerate(layer_mib):
        tmp = Path(layout) / "blobs" / "tmp.gz"
        with open(tmp, "wb") as f:
            blob = _Hashing(f)
            with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=0, mtime=0) as gz:
                tar_stream = _Hashing(gz)
                with tarfile.open(fileobj=tar_stream, mode="w", format=tarfile.PAX_FORMAT,
                                  bufsize=1 << 20) as tar:
                    tar.addfile(_tar_info(f"data/blob-{i}.bin", mib << 20),
                                _Random(mib << 20))
        digest = blob.digest()
        tmp.rename(Path(layout) / "blobs" / "sha256" / digest.split(":", 1)[1])
        layers.append(BlobLayer(digest, tar_stream.digest(),
                                os.path.getsize(Path(layout) / "blobs" / "sha256" /
                                                digest.split(":", 1)[1])))
    write_layout(layout, layers, cmd=["/bin/sh"])
    return layers


def small_files_image(layout, files, layers=2):
    """``files`` small random files (0.5-8 KiB) in 100 directories, spread over ``layers``."""
    import random
    import tarfile
    rnd = random.Random(8)
    out = []
    for n in range(layers):
        tar_path = Path(layout).parent / f"small-{n}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            if n == 0:  # a shell to run in it
                for path, entry in sorted(im._normalise(im.busybox_rootfs()).items()):
                    if isinstance(entry, im.File):
                        tar.addfile(_tar_info(path, len(entry.data), entry.mode),
                                    io.BytesIO(entry.data))
                    elif isinstance(entry, im.Symlink):
                        info = _tar_info(path, mode=0o777)
                        info.type, info.linkname = tarfile.SYMTYPE, entry.target
                        tar.addfile(info)
                    else:
                        info = _tar_info(path, mode=entry.mode)
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
            for d in range(100):
                info = _tar_info(f"srv/l{n}/d{d:03d}", mode=0o755)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            for i in range(files // layers):
                size = rnd.randint(512, 8192)
                tar.addfile(_tar_info(f"srv/l{n}/d{i % 100:03d}/f{i:06d}", size),
                            io.BytesIO(os.urandom(size)))
        out.append(gzip_tar_into_layout(tar_path, layout, level=6))
    write_layout(layout, out, cmd=["/bin/sh"])
    return out


# Debian's base: what debootstrap installs (Priority required + important) and what they need
DEBIAN_BASE = None
DEBIAN_QUICK = ("dash", "coreutils", "bash")


def debian_packages(roots=None):
    """The installed packages ``roots`` (default: Priority required/important, Essential) and
    the closure of their Depends/Pre-Depends, as installed on this host."""
    import re
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${Priority}\t${Essential}\t"
                          "${Pre-Depends}, ${Depends}\t${db:Status-Abbrev}\n"],
                         check=True, capture_output=True, text=True).stdout
    pkgs = {}
    for line in out.splitlines():
        name, prio, essential, deps, status = line.split("\t")
        if status.startswith("ii"):
            pkgs[name.split(":")[0]] = (prio, essential, deps)
    todo = list(roots or [n for n, (p, e, _) in pkgs.items()
                          if p in ("required", "important") or e == "yes"])
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in pkgs:
            continue
        seen.add(name)
        for alternatives in pkgs[name][2].split(","):
            for alt in alternatives.split("|"):
                alt = re.sub(r"\(.*?\)|\[.*?\]|:any", "", alt).strip()
                if alt in pkgs:
                    todo.append(alt)
                    break
    return sorted(seen)


def debian_image(layout, quick=False):
    """A one-layer Debian 12 image made of this host's files of its base packages.

    No debootstrap (not installed, no internet): the files ``dpkg -L`` lists for the base
    packages (see :func:`debian_packages`), paths resolved through the merged-/usr
    symlinks, plus the top-level symlinks, passwd/group, ld.so.cache and empty system dirs.
    Returns (layers, number of packages).
    """
    pkgs = debian_packages(DEBIAN_QUICK if quick else DEBIAN_BASE)
    listed = subprocess.run(["dpkg", "-L", *pkgs], check=True, capture_output=True,
                            text=True).stdout.split("\n")
    paths = set()
    for p in listed:
        if not p.startswith("/") or p in ("/", "/."):
            continue
        real = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        if os.path.lexists(real) and not real.startswith(("/proc", "/sys", "/dev")):
            paths.add(real)
    for extra in ("/bin", "/sbin", "/lib", "/lib64", "/etc/passwd", "/etc/group",
                  "/etc/ld.so.cache", "/tmp", "/root", "/home", "/dev", "/proc", "/sys",
                  "/var/lib/dpkg/status"):
        if os.path.lexists(extra):
            paths.add(extra)
    parents = {os.path.dirname(p) for p in paths}
    while parents - paths - {"/"}:
        new = parents - paths - {"/"}
        paths |= new
        parents = {os.path.dirname(p) for p in new}
    listing = Path(layout).parent / "debian.list"
    listing.write_text("".join(p.lstrip("/") + "\n" for p in sorted(paths)))
    tar_path = Path(layout).parent / "debian.tar"
    subprocess.run(["tar", "-cf", str(tar_path), "--no-recursion", "-C", "/", "-T",
                    str(listing)], check=True)
    layers = [gzip_tar_into_layout(tar_path, layout, level=6)]
    write_layout(layout, layers, cmd=["/bin/bash"])
    return layers, len(pkgs)


def push_image(reg, build, name, tag="1", **kw):
    """Build an image with ``build(layout, **kw)`` in a temp dir, push it; return (ref, size)."""
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    try:
        build(work / "layout", **kw)
        pushed = reg.push(work / "layout", "src", name, tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return f"{reg.host}/{name}:{tag}", sum(b.size for b in pushed.layers)


def udocker_env(env, udocker_dir):
    """udocker's own CLI on the host's proot, in ``udocker_dir``, never fetching its tarball."""
    return dict(env, UDOCKER_DIR=str(udocker_dir), UDOCKER_TARBALL="",
                UDOCKER_USE_PROOT_EXECUTABLE=shutil.which("proot") or "")


UDOCKER_ROOT_OPTS = ["--allow-root"] if os.getuid() == 0 else []
