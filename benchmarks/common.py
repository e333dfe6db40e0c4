"""Shared pieces of the benchmarks: a registry with a large image, timing with peak memory.

Benchmarks compare datalad-udocker with skopeo, udocker and plain tools *in the same run*
on the same machine and print ratios; they assert nothing about absolute speed.
"""
from __future__ import annotations

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
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
            "dt = time.perf_counter() - t\n"
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n")


def measure(cmd, cwd=None, env=None):
    """Run ``cmd``; return (seconds, peak RSS of the largest process in MiB)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], cwd=cwd, env=env,
                         check=True, text=True, stdout=subprocess.PIPE).stdout.split()
    seconds, rss_kib, rc = float(out[0]), int(out[1]), int(out[2])
    if rc != 0:
        raise SystemExit(f"benchmark command failed ({rc}): {' '.join(map(str, cmd))}")
    return seconds, rss_kib / 1024


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
