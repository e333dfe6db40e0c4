"""The blob cache (dataset/blobcache.py): a layer is downloaded once per machine (or site), not
once per clone, and a cache entry is used only after it verified.

Every registry request goes through a real FaultProxy in front of the test registry, which
records them: the tests count the GETs of each layer blob.

- ``udocker-import`` into a second dataset takes every layer from the cache (hardlinked, no GET).
- ``datalad get`` in fresh clones of a dataset whose origin holds no content (git and the
  git-annex branch only, as on a git hosting site) takes the layers from the cache; an entry
  really corrupted (same size, one byte flipped), replaced by a symlink (to the right bytes) or
  by a FIFO is rejected, removed and fetched again from the registry, once.
- A Slurm job array of 8 fresh clones, all starting with an empty cache, downloads each layer
  from the registry exactly once across the whole array.
- A site directory filled by one user is read by another user who cannot write it: no GET, no
  write there, copies not hardlinks; a poisoned site entry is ignored (not deleted: not theirs)
  and the layer comes from the registry.
- A filler SIGKILLed before its rename leaves no entry, only a temporary file, which the next
  filler of that blob removes; a dataset's committed config names no cache directory.
- A site directory made as docs/cluster.rst says, with a hostile fellow filler (``udtest``)
  next to the victim (``udtest2``): a temp file swapped for a symlink to the victim's secret
  (no fill without the sticky bit; refused with it), subdirectories replaced by symlinks (not
  followed), a lock held for ever or a FIFO in its place (the fill goes on); our own stale
  temporary files are removed.

The test session turns the cache off (tests/conftest.py, and for the non-root user
tests/fixtures/users.py); these tests turn it on.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import datalad.api as dl
import pytest

from checks import git, imp
from fixtures.proxy import FaultProxy
from fixtures.users import UserRunner
from test_special_remote import publish_git_only

from datalad_udocker.digest import annex_key, file_digest

pytestmark = pytest.mark.timeout(600)

IMAGE = "test/multi:1"
LAYOUT = ".datalad/environments/multi/image"
TASKS = 8


@pytest.fixture(scope="module")
def proxy(registry):
    """A recording proxy in front of the registry, for the whole module."""
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def layers(registry):
    return registry.images[IMAGE].layers


def layer_gets(proxy, layers) -> dict:
    """``{layer digest: number of GETs the registry got for it}`` since the last clear."""
    return {layer.digest: len(proxy.seen(path=re.escape(layer.digest) + "$", method="GET"))
            for layer in layers}


@pytest.fixture
def user_cache(tmp_path, monkeypatch) -> Path:
    """The cache on, in a fresh XDG_CACHE_HOME; its ``sha256`` directory."""
    monkeypatch.setenv("DATALAD_UDOCKER_BLOB__CACHE", "true")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "datalad-udocker" / "blobs" / "sha256"


def object_path(ds_path, layer) -> Path:
    """The annex object of ``layer`` in the dataset (its layout file's link target; no git
    call: the dataset may be another user's)."""
    link = Path(ds_path) / LAYOUT / "blobs" / "sha256" / layer.digest.split(":")[1]
    obj = Path(os.path.realpath(link))
    assert obj.name == annex_key(layer.digest, layer.size) and obj.is_file(), \
        f"{layer.digest} is not in {ds_path}"
    return obj


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_second_import_takes_the_layers_from_the_cache(tmp_path, proxy, layers, user_cache):
    ref = f"{proxy.host}/{IMAGE}"
    proxy.clear()
    first = imp(dl.create(tmp_path / "a", result_renderer="disabled"), ref)
    assert first["status"] == "ok", first
    assert set(layer_gets(proxy, layers).values()) == {1}
    second_ds = dl.create(tmp_path / "b", result_renderer="disabled")
    second = imp(second_ds, ref)
    assert second["status"] == "ok", second
    assert "from the blob cache" in second["message"], second["message"]
    assert set(layer_gets(proxy, layers).values()) == {1}, "the second import downloaded"
    for layer in layers:
        entry = user_cache / layer.digest.split(":")[1]
        assert file_digest(entry) == layer.digest
        assert same_inode(entry, object_path(second_ds.path, layer))   # hardlinked, no copy
    git(second_ds.path, "annex", "fsck", "-q")


def get_in_fresh_clone(bare: Path, where: Path, thin=False) -> Path:
    """``datalad clone`` + ``datalad get`` of the image, in subprocesses (a bug that blocks on a
    planted FIFO must fail the test, not hang it).  ``thin``: with ``annex.thin``, whose
    objects must not share an inode with the cache (entries are copied, not linked)."""
    env = dict(os.environ)
    subprocess.run(["datalad", "clone", str(bare), str(where)], check=True, env=env,
                   capture_output=True, timeout=120)
    if thin:
        git(where, "config", "annex.thin", "true")
    subprocess.run(["datalad", "get", LAYOUT], cwd=where, check=True, env=env,
                   capture_output=True, timeout=120)
    return where


def test_clones_take_layers_from_the_cache_and_reject_bad_entries(tmp_path, proxy, layers,
                                                                 user_cache):
    ds = dl.create(tmp_path / "ds", result_renderer="disabled")
    assert imp(ds, f"{proxy.host}/{IMAGE}")["status"] == "ok"     # fills the cache
    bare = publish_git_only(ds, tmp_path / "bare.git")            # no content there
    proxy.clear()
    clone = get_in_fresh_clone(bare, tmp_path / "c1")
    assert set(layer_gets(proxy, layers).values()) == {0}
    for layer in layers:
        assert same_inode(user_cache / layer.digest.split(":")[1], object_path(clone, layer))

    victim = layers[0]
    entry = user_cache / victim.digest.split(":")[1]
    good = tmp_path / "good-bytes"
    shutil.copyfile(entry, good)

    def plant(make):
        """Replace the entry (not its inode: the annex objects linked to it stay intact)."""
        entry.unlink()
        make()

    def flipped():
        data = bytearray(good.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))

    attacks = [("corrupted", flipped, False), ("corrupted, copied", flipped, True),
               ("symlink", lambda: entry.symlink_to(good), False),
               ("symlink, copied", lambda: entry.symlink_to(good), True),
               ("fifo", lambda: os.mkfifo(entry), False)]
    for n, (name, make, thin) in enumerate(attacks, start=2):
        plant(make)
        proxy.clear()
        clone = get_in_fresh_clone(bare, tmp_path / f"c{n}", thin)
        gets = layer_gets(proxy, layers)
        assert gets.pop(victim.digest) == 1, f"{name}: the layer was not fetched again"
        assert set(gets.values()) == {0}, name
        # the bad entry is gone, a good one took its place, the clone holds the right bytes
        assert stat.S_ISREG(os.lstat(entry).st_mode), name
        assert file_digest(entry) == victim.digest, name
        assert file_digest(object_path(clone, victim)) == victim.digest, name
        git(clone, "annex", "fsck", "-q")
        assert same_inode(entry, object_path(clone, victim)) != thin, name
    assert file_digest(good) == victim.digest       # the symlink's target was not touched


def publish_as(user, work):
    """``work/origin``'s git history and git-annex branch, no content and no remote, in the
    bare repository ``work/bare.git``, as ``user`` (as :func:`publish_git_only`)."""
    user.run(["git", "clone", "-q", "--bare", "origin", "bare.git"], cwd=work)
    user.run(["git", "-C", "bare.git", "fetch", "-q", "../origin", "git-annex:git-annex"],
             cwd=work)
    user.run(["git", "-C", "bare.git", "remote", "remove", "origin"], cwd=work)


def test_job_array_downloads_each_layer_once(nonroot, slurm, proxy, layers):
    """8 Slurm tasks, each a fresh clone of a content-less origin, one empty cache."""
    work = nonroot.make_tempdir("udtest-blobarray-")
    nonroot.run(["datalad", "create", "origin"], cwd=work)
    nonroot.run(["datalad", "udocker-import", "-d", "origin", f"{proxy.host}/{IMAGE}"],
                cwd=work)                    # the cache is off: the array starts empty
    publish_as(nonroot, work)
    script = work / "get-job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=slurm-%A_%a.out\nset -eu\n"
                      'datalad clone "$DATASET" "task-$SLURM_ARRAY_TASK_ID"\n'
                      'cd "task-$SLURM_ARRAY_TASK_ID"\n'
                      f"datalad get {LAYOUT}\n")
    cache = work / "cache"
    env = {"DATASET": str(work / "bare.git"), "XDG_CACHE_HOME": str(cache),
           "DATALAD_UDOCKER_BLOB__CACHE": "true", **slurm.env}
    proxy.clear()
    res = nonroot.run(["sbatch", "--parsable", f"--array=1-{TASKS}", str(script)],
                      cwd=work, env=env)
    job = res.stdout.strip().split(";")[0]
    states = slurm.wait_done(job)
    for task in range(1, TASKS + 1):
        log = work / f"slurm-{job}_{task}.out"
        assert states.get(f"{job}_{task}") == "COMPLETED", \
            log.read_text(errors="replace") if log.exists() else states
    gets = layer_gets(proxy, layers)
    print(f"\n[blobcache] {TASKS} clones, registry GETs per layer: {sorted(gets.values())}")
    assert set(gets.values()) == {1}, f"registry GETs per layer across the array: {gets}"
    # every clone holds every layer, as a hardlink of the one cache entry
    for layer in layers:
        entry = cache / "datalad-udocker" / "blobs" / "sha256" / layer.digest.split(":")[1]
        assert file_digest(entry) == layer.digest
        for task in range(1, TASKS + 1):
            assert same_inode(entry, object_path(work / f"task-{task}", layer)), task
    shutil.rmtree(work, ignore_errors=True)


def test_site_dir_filled_by_one_user_read_by_another(nonroot, proxy, layers):
    other = UserRunner(user="udtest2")
    with (other.home / ".gitconfig").open("a") as f:
        f.write("[safe]\n\tdirectory = *\n")       # clone udtest's repository
    work = nonroot.make_tempdir("udtest-blobsite-")
    site = nonroot.make_tempdir("udtest-site-")     # udtest's, 0755: others read only
    nonroot.run(["datalad", "create", "origin"], cwd=work)
    nonroot.run(["datalad", "udocker-import", "-d", "origin", f"{proxy.host}/{IMAGE}"],
                cwd=work)                    # the cache is off: nothing filled yet
    publish_as(nonroot, work)
    bare = work / "bare.git"

    def get(runner, name):
        where = runner.make_tempdir(f"{runner.user}-{name}-")
        env = {"DATALAD_UDOCKER_BLOB__CACHE__SITE": str(site),
               "DATALAD_UDOCKER_BLOB__CACHE": "true", "XDG_CACHE_HOME": str(where / "cache")}
        runner.run(["datalad", "clone", str(bare), "clone"], cwd=where, env=env)
        runner.run(["datalad", "get", LAYOUT], cwd=where / "clone", env=env)
        return where

    def snapshot():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_mode)
                for p in sorted((site / "sha256").iterdir())}

    proxy.clear()
    get(nonroot, "fill")                          # udtest fills the site directory
    assert set(layer_gets(proxy, layers).values()) == {1}
    before = snapshot()
    assert sorted(before) == sorted(layer.digest.split(":")[1] for layer in layers)
    assert all(mode & 0o777 == 0o444 for _, _, mode in before.values())
    # copies, not hardlinks of the filler's annex objects
    assert all(p.stat().st_nlink == 1 for p in (site / "sha256").iterdir())

    proxy.clear()
    reader = get(other, "read")                   # udtest2 reads it, without write access
    assert set(layer_gets(proxy, layers).values()) == {0}
    assert snapshot() == before
    for layer in layers:
        obj = object_path(reader / "clone", layer)
        assert not same_inode(obj, site / "sha256" / layer.digest.split(":")[1])
        assert obj.stat().st_uid == other.uid and file_digest(obj) == layer.digest

    # udtest poisons one entry; udtest2 ignores it (not theirs to delete) and downloads
    victim = layers[0]
    name = victim.digest.split(":")[1]
    nonroot.run(f"cd {site}/sha256 && head -c {victim.size} /dev/zero > tmp-x && "
                f"chmod 444 tmp-x && mv -f tmp-x {name}")
    proxy.clear()
    reader = get(other, "poisoned")
    gets = layer_gets(proxy, layers)
    assert gets.pop(victim.digest) == 1 and set(gets.values()) == {0}, gets
    assert file_digest(object_path(reader / "clone", victim)) == victim.digest
    assert (site / "sha256" / name).read_bytes() == bytes(victim.size)   # left in place
    # ...and keeps the good copy in its own cache
    own = reader / "cache" / "datalad-udocker" / "blobs" / "sha256" / name
    assert file_digest(own) == victim.digest
    for path in (work, site):
        shutil.rmtree(path, ignore_errors=True)


def test_fill_is_atomic_and_a_killed_fillers_leftovers_go(tmp_path, user_cache):
    """A filler killed mid-copy leaves only a file in ``tmp/``: never a partial entry, and the
    next filler of that blob removes it (it holds the lock: the dead one no longer does)."""
    from datalad_udocker.dataset.blobcache import BlobCache
    from datalad_udocker.digest import sha256_digest

    data = os.urandom(3 << 20)
    digest = sha256_digest(data)
    root = user_cache.parent
    cache = BlobCache.configured()
    stale = root / "tmp" / f"{digest.hex}.0123456789abcdef.tmp"
    code = (f"import os, sys\nsys.path[:0] = {sys.path!r}\n"
            "from datalad_udocker.dataset import blobcache\n"
            "def stop(*a, **k):\n    os.kill(os.getpid(), 9)\n"
            "blobcache.os.replace = stop       # killed just before the rename\n"
            f"c = blobcache.CacheDir({str(root)!r})\n"
            "with c.opened(create=True) as fds:\n"
            f"    c.put(fds, {str(tmp_path / 'src')!r}, {digest!r}, {len(data)}, False)\n")
    (tmp_path / "src").write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leftovers = list((root / "tmp").iterdir())
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == len(data)
    assert not (user_cache / digest.hex).exists()         # no partial entry, no entry
    leftovers[0].rename(stale)

    fetched = []

    def download(dest, progress):
        fetched.append(dest)
        Path(dest).write_bytes(data)
    assert not cache.fetch(digest, len(data), str(tmp_path / "a"), download)
    assert fetched and not stale.exists() and list((root / "tmp").iterdir()) == []
    assert file_digest(user_cache / digest.hex) == digest
    assert cache.fetch(digest, len(data), str(tmp_path / "b"), download)    # from the cache
    assert len(fetched) == 1


def test_site_dir_is_never_taken_from_a_dataset(ds, tmp_path, user_cache):
    """A dataset that commits ``datalad.udocker.blob-cache-site`` (a directory its author
    controls) in ``.datalad/config`` names no cache: the setting is the user's own."""
    from datalad_udocker.dataset.blobcache import BlobCache

    planted = tmp_path / "planted"
    planted.mkdir()
    ds.config.set("datalad.udocker.blob-cache-site", str(planted), scope="branch")
    ds.config.set("datalad.udocker.blob-cache", "false", scope="branch")
    ds.save(result_renderer="disabled")
    assert [(d.root, d.shared) for d in BlobCache.configured(ds).dirs] == \
        [(str(user_cache.parent), False)]
    git(ds.path, "config", "datalad.udocker.blob-cache-site", str(planted))   # the user's own
    assert [d.root for d in BlobCache.configured(ds).dirs] == \
        [str(user_cache.parent), str(planted)]


# -- a site directory shared by a group of fillers, one of them hostile -------------------------
# The victim is ``udtest2`` with the fillers' group (``udtest``'s) as a supplementary group, the
# attacker ``udtest`` (``nonroot``), a fellow member; the site is made as docs/cluster.rst says.
FILLERS_ATTACK_SIZE = 48 << 20


def as_user(runner, code, groups=(), timeout=120, **kw):
    """``python -c code`` as ``runner``'s user with ``groups`` as supplementary groups (real
    processes: root switches with setpriv); a Popen with text pipes."""
    assert os.geteuid() == 0, "these tests switch between two users: run them as root"
    argv = ["setpriv", f"--reuid={runner.uid}", f"--regid={runner.gid}",
            "--groups=" + ",".join(str(g) for g in (runner.gid, *groups)), "--",
            sys.executable, "-c", f"import sys\nsys.path[:0] = {sys.path!r}\n" + code]
    return subprocess.Popen(argv, env=runner.env(kw.get("env")), cwd=str(runner.home),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


VICTIM_FETCH = """
import hashlib, os, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from datalad_udocker.dataset.blobcache import BlobCache
data = {data}
digest = "sha256:" + hashlib.sha256(data).hexdigest()
def download(dest, progress):
    with open(dest, "wb") as f:
        f.write(data)
print("from cache", BlobCache.configured().fetch(digest, len(data), {dest!r}, download))
"""


@pytest.fixture
def fillers(nonroot, tmp_path):
    """(victim runner, attacker runner, site, victim's private directory): a site directory
    ``mkdir site/{sha256,tmp,locks}; chgrp -R fillers; chmod -R 2775``, owned by root."""
    victim = UserRunner(user="udtest2")
    group = nonroot.gid
    site = Path(victim.make_tempdir("blobsite-"))
    os.chown(site, 0, group)
    for sub in ("sha256", "tmp", "locks"):
        (site / sub).mkdir()
        os.chown(site / sub, 0, group)
    for path in (site, site / "sha256", site / "tmp", site / "locks"):
        os.chmod(path, 0o2775)
    private = victim.make_tempdir("victim-")
    yield victim, nonroot, site, private, group
    for path in (site, private):
        shutil.rmtree(path, ignore_errors=True)


def victim_env(victim, site, private, **extra):
    return {"DATALAD_UDOCKER_BLOB__CACHE": "true", "XDG_CACHE_HOME": str(private / "cache"),
            "DATALAD_UDOCKER_BLOB__CACHE__SITE": str(site), **extra}


SWAPPER = """
import os, sys, time
tmp, secret = sys.argv[1], sys.argv[2]
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end and not os.path.exists(tmp + "/../stop-swapper"):
    for n in os.listdir(tmp):
        p = os.path.join(tmp, n)
        try:
            if n.endswith(".tmp") and os.lstat(p).st_uid != os.getuid():
                os.rename(p, p + ".stolen")
                os.symlink(secret, p)
                print("swapped", n, flush=True); raise SystemExit
        except FileNotFoundError:
            pass
        except PermissionError:
            print("refused", n, flush=True); raise SystemExit
print("saw nothing", flush=True)
"""


def swapper(attacker, site, secret):
    """The attacker's process: swaps the victim's first temporary file in ``site/tmp`` for a
    symlink to ``secret`` (so a chmod by path makes the secret world-readable)."""
    code = SWAPPER.replace("sys.argv[1], sys.argv[2]", f"{str(site / 'tmp')!r}, {str(secret)!r}")
    proc = as_user(attacker, code)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_site_dir_without_sticky_bit_is_not_filled(fillers):
    """F1: in a group-writable ``tmp/`` without the sticky bit another filler can swap the
    victim's temporary file for a symlink to the victim's private file; the victim fills no
    such site (one warning, saying ``chmod +t``), fills its own cache instead, and its private
    file keeps its mode.  With the sticky bit (3775) it fills the site; the swap is refused."""
    victim, attacker, site, private, group = fillers
    secret = private / "secret"
    secret.write_text("victim's private key\n")
    victim.chown(secret)
    secret.chmod(0o600)
    data = "os.urandom(%d)" % FILLERS_ATTACK_SIZE
    env = victim_env(victim, site, private)

    att = swapper(attacker, site, secret)
    code, out, err = finish(as_user(victim, VICTIM_FETCH.format(
        data=data, dest=str(private / "a")), groups=[group], env=env))
    (site / "stop-swapper").touch()
    _, att_out, _ = finish(att)
    assert code == 0, err
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600, f"attacker: {att_out}"
    assert "from cache False" in out
    assert "chmod +t" in err and err.count("WARNING") == 1, err
    assert list((site / "tmp").iterdir()) == [] and list((site / "sha256").iterdir()) == []
    assert len(list((private / "cache" / "datalad-udocker" / "blobs" / "sha256").iterdir())) == 1
    (site / "stop-swapper").unlink()

    for path in (site, site / "sha256", site / "tmp", site / "locks"):
        os.chmod(path, 0o3775)
    att = swapper(attacker, site, secret)
    code, out, err = finish(as_user(victim, VICTIM_FETCH.format(
        data=data, dest=str(private / "b")), groups=[group], env=env))
    (site / "stop-swapper").touch()
    _, att_out, _ = finish(att)
    assert code == 0 and "WARNING" not in err, err
    assert "swapped" not in att_out, att_out
    print(f"\n[blobcache] attacker on a sticky tmp/: {att_out.strip()}")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    [entry] = list((site / "sha256").iterdir())
    st = entry.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == victim.uid
    assert stat.S_IMODE(st.st_mode) == 0o444 and file_digest(entry) == "sha256:" + entry.name


def test_site_subdirs_replaced_by_symlinks_are_not_followed(fillers):
    """F2: a fellow filler replaces ``site/sha256`` and ``site/tmp`` by symlinks to a directory
    of the victim holding a file named like the blob's entry (not the blob's bytes); the victim
    neither reads, deletes nor writes there: one warning, the blob from the registry."""
    victim, attacker, site, private, group = fillers
    data = b"z" * 5000
    import hashlib
    hexname = hashlib.sha256(data).hexdigest()
    docs = private / "docs"
    docs.mkdir()
    victim.chown(docs)
    (docs / hexname).write_bytes(b"the victim's own document".ljust(len(data), b"."))
    victim.chown(docs / hexname)
    attacker.run(f"cd {site} && mv sha256 sha256.old && ln -s {docs} sha256 && "
                 f"mv tmp tmp.old && ln -s {docs} tmp")
    before = sorted(os.listdir(docs))
    code, out, err = finish(as_user(victim, VICTIM_FETCH.format(
        data=repr(data), dest=str(private / "a")), groups=[group], env=victim_env(
            victim, site, private)))
    assert code == 0, err
    assert sorted(os.listdir(docs)) == before, err
    assert (docs / hexname).read_bytes().startswith(b"the victim's own document")
    assert "from cache False" in out and (private / "a").read_bytes() == data
    assert "is a symlink" in err, err


LOCK_HOLDER = """
import fcntl, os, sys
path = {path!r}
if {fifo}:
    os.mkfifo(path, 0o644)
    print("planted", flush=True)
else:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("holding", flush=True)
sys.stdin.read()            # until the test closes it
"""


@pytest.mark.parametrize("how", ["flock", "fifo"])
def test_a_held_or_planted_lock_does_not_stall_a_fill(fillers, how):
    """F3: any reader of ``locks/<hex>`` may hold it; a fellow filler's real process holding it
    forever (or a FIFO planted there) delays the victim's fill at most the lock wait."""
    victim, attacker, site, private, group = fillers
    for path in (site, site / "sha256", site / "tmp", site / "locks"):
        os.chmod(path, 0o3775)
    data = b"q" * 7000
    import hashlib
    lock = site / "locks" / hashlib.sha256(data).hexdigest()
    holder = as_user(attacker, LOCK_HOLDER.format(path=str(lock), fifo=how == "fifo"))
    try:
        assert holder.stdout.readline().strip() in ("holding", "planted")
        proc = as_user(victim, VICTIM_FETCH.format(data=repr(data), dest=str(private / "a")),
                       groups=[group], env=victim_env(
                           victim, site, private,
                           DATALAD_UDOCKER_BLOB__CACHE__LOCK__WAIT="1"))
        code, out, err = finish(proc, timeout=60)     # the old code blocked here for ever
        assert code == 0, err
        assert "from cache False" in out and (private / "a").read_bytes() == data
        if how == "flock":
            assert "still held" in err, err
        entry = site / "sha256" / lock.name
        assert entry.read_bytes() == data and entry.stat().st_uid == victim.uid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_own_stale_temporary_files_are_removed(tmp_path, user_cache, monkeypatch):
    """F5: our temporary files left by a killed process in the cache's ``tmp/`` (of any blob)
    and in the destination directory (``.blobcache-*``) go when they are older than
    STALE_AFTER; younger ones, and other users' files, stay."""
    from datalad_udocker.dataset import blobcache
    from datalad_udocker.digest import sha256_digest

    cache = blobcache.BlobCache.configured()
    blobs = [os.urandom(1000 + n) for n in range(3)]
    dest_dir = tmp_path / "annex-tmp"
    dest_dir.mkdir()

    def fetch(n):
        def download(dest, progress):
            Path(dest).write_bytes(blobs[n])
        return cache.fetch(sha256_digest(blobs[n]), len(blobs[n]), str(dest_dir / f"k{n}"),
                           download)
    assert not fetch(0)                           # makes the cache
    tmp = user_cache.parent / "tmp"
    ours = [tmp / f"{'a' * 64}.0123456789abcdef.tmp", dest_dir / ".blobcache-.0123456789abcdef.tmp"]
    theirs = tmp / f"{'b' * 64}.0123456789abcdef.tmp"
    for path in ours + [theirs]:
        path.write_bytes(b"left by a killed process")
    os.chown(theirs, 1001, 1001)
    assert fetch(0)                               # young: kept
    assert all(p.exists() for p in ours + [theirs])
    monkeypatch.setattr(blobcache, "STALE_AFTER", 0)
    assert not fetch(1)                           # a fill of another blob cleans tmp/
    assert not ours[0].exists() and theirs.exists()
    assert fetch(1)                               # taken into dest_dir: cleans it
    assert not ours[1].exists()
    assert sorted(p.name for p in dest_dir.iterdir()) == ["k0", "k1"]
