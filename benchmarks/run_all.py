"""The benchmark suite of issue 8: every row of its table, each against its yardstick, one run.

    .venv/bin/python benchmarks/run_all.py [--quick] [--repeat N] [--out DIR] [--rows R,...]

Starts its own registry on 127.0.0.1 (the tests' fixture), builds and pushes three images
(a 1 GiB image of 10 incompressible layers, an image of many small files, and a Debian 12
base image made of this host's own files: see ``common.debian_image``), then measures each
operation of datalad-udocker and the tool a user would pick instead, alternating the two in
every repeat so that both see the same machine load.  Prints a Markdown table (median,
min-max, ratio, the issue's target, whether it holds) and writes it to
``benchmarks/results.md``, ``docs/_static/benchmarks.rst.inc`` and a plot
``docs/_static/benchmarks.png`` (``--quick``: small images, 1 repeat, files under a temp dir
unless ``--out`` is given; ``--rows``: only those rows, e.g. ``--rows clone-get,import-small``,
written to a temp dir unless ``--out`` is given).  It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import (REPO, UDOCKER_ROOT_OPTS, Registry, debian_image, git_identity_env,
                    measure, push_image, random_image, small_files_image, udocker_env)
from report import Row, markdown, plot, rst_list_table

PYTHON = str(REPO / ".venv" / "bin" / "python")
#: the rows, in the order they are measured (``--rows``)
ROWS = ("import-big", "clone-get", "clone-get-cached", "export", "warm-run", "first-run",
        "import-small", "create-small")
ENV_DIR = ".datalad/environments"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Suite:
    def __init__(self, work: Path, repeat: int, compare=None):
        self.work, self.repeat = work, repeat
        self.env = git_identity_env()
        self.env["DATALAD_UDOCKER_EXECMODE"] = "P1"
        # rows measure downloads from the registry: no blob cache, except where a row says so
        self.env["DATALAD_UDOCKER_BLOB__CACHE"] = "false"
        #: the environment that runs another install (``--compare VENV``), or None
        self.compare_env = None if compare is None else dict(
            self.env, PATH=f"{Path(compare).resolve() / 'bin'}{os.pathsep}{self.env['PATH']}")
        self.compare_label = f"the same with `{compare}`"
        self.rows = []
        self.n = 0

    # -- helpers -------------------------------------------------------------------------
    def fresh(self, stem):
        """A new path under the work dir (not created)."""
        self.n += 1
        return self.work / f"{stem}-{self.n}"

    def run(self, cmd, cwd=None, env=None):
        subprocess.run(list(map(str, cmd)), cwd=cwd, env=env or self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def time(self, cmd, cwd=None, env=None):
        return measure(cmd, cwd=cwd or self.work, env=env or self.env)

    def create(self):
        ds = self.fresh("ds")
        self.run(["datalad", "create", ds])
        return ds

    def imported(self, ref, name):
        ds = self.create()
        self.run(["datalad", "udocker-import", "-n", name, ref], cwd=ds)
        return ds

    def bare(self, ds):
        """A bare git clone of ``ds`` that forgets ``ds``: clones of it can get the layers
        from the registry only (DataLad would otherwise add ``ds`` as remote ``origin-2``)."""
        bare = self.fresh("bare").with_suffix(".git")
        self.run(["git", "clone", "-q", "--bare", ds, bare])
        self.run(["git", "--git-dir", bare, "remote", "remove", "origin"])
        return bare

    def skopeo_copy(self, ref):
        dest = self.fresh("skopeo")
        sample = self.time(["skopeo", "copy", "-q", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{dest}:1"])
        shutil.rmtree(dest, ignore_errors=True)
        return sample

    def udocker(self, udir, *args):
        """``udocker ARGS`` with the host's proot, from the work dir (it reads ./u.conf)."""
        return ["udocker", *UDOCKER_ROOT_OPTS, *args], udocker_env(self.env, udir)

    def add(self, row):
        self.rows.append(row)
        log(f"  {row.key}: ours {row.ours} vs {row.yardstick} {row.yard}"
            + "".join(f"; {label} {samples}" for label, samples in row.also))

    # -- rows ----------------------------------------------------------------------------
    def compared(self, samples):
        """``Row.also`` for the samples of the ``--compare`` install (none without it)."""
        return [(self.compare_label, samples)] if self.compare_env else []

    def import_rows(self, ref, what, key):
        """udocker-import (net of datalad create) vs skopeo copy; returns (kept ds, RSS)."""
        ours, yard, rss, yard_rss, other, kept = [], [], [], [], [], None
        for _ in range(self.repeat):
            s, m = self.skopeo_copy(ref)
            yard.append(s)
            yard_rss.append(m)
            if self.compare_env:
                ds = self.create()
                other.append(self.time(["datalad", "udocker-import", "-n", key, ref], cwd=ds,
                                       env=self.compare_env)[0])
                shutil.rmtree(ds)
            ds = self.create()
            s, m = self.time(["datalad", "udocker-import", "-n", key, ref], cwd=ds)
            ours.append(s)
            rss.append(m)
            if kept is None:
                kept = ds
            else:
                shutil.rmtree(ds)
        self.add(Row(f"import {key}", f"`udocker-import` of {what} (net of `datalad create`)",
                     ours, "`skopeo copy docker:// oci:`", yard, target=1.0,
                     also=self.compared(other)))
        return kept, rss, yard_rss

    def clone_get_row(self, ds, ref, key, what):
        bare = self.bare(ds)
        ours, yard, other = [], [], []
        for _ in range(self.repeat):
            yard.append(self.skopeo_copy(ref)[0])
            for env, samples in [(self.compare_env, other), (self.env, ours)]:
                if env is None:
                    continue
                clone = self.fresh("clone")
                samples.append(self.time(["sh", "-c", 'datalad clone "$1" "$2" && '
                                          'datalad get -d "$2" "$2/$3"', "sh", bare, clone,
                                          f"{ENV_DIR}/{key}/image"], env=env)[0])
                shutil.rmtree(clone)
        self.add(Row(f"clone+get {key}", f"fresh `datalad clone` + `datalad get` of {what}'s "
                     "layout from the registry", ours, "`skopeo copy docker:// oci:`", yard,
                     target=1.0, also=self.compared(other)))

    def clone_get_cached_row(self, ds, key, what):
        """clone + get with the layers in the blob cache (filled by one clone + get first) vs
        the same with the cache off (from the registry), measured alternately."""
        bare = self.bare(ds)
        cached = dict(self.env, DATALAD_UDOCKER_BLOB__CACHE="true",
                      XDG_CACHE_HOME=str(self.fresh("xdg-cache")))
        cmd = ["sh", "-c", 'datalad clone "$1" "$2" && datalad get -d "$2" "$2/$3"', "sh",
               bare]
        ours, yard = [], []
        for i in range(self.repeat + 1):
            for env, times in ((cached, ours), (self.env, yard)):
                clone = self.fresh("clone")
                took = self.time(cmd + [clone, f"{ENV_DIR}/{key}/image"], env=env)[0]
                if i:                      # the first cached one fills the cache
                    times.append(took)
                shutil.rmtree(clone)
        self.add(Row(f"clone+get {key} cached", f"fresh `datalad clone` + `datalad get` of "
                     f"{what}'s layout with its layers in the blob cache (hardlinked)", ours,
                     "the same from the registry (cache off)", yard, target=1.0))

    def export_rows(self, ds, key, what):
        layout = ds / ENV_DIR / key / "image"
        manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
        blobs_dir = layout / "blobs" / "sha256"
        man = json.loads((blobs_dir / manifest.split(":")[1]).read_text())
        blobs = [blobs_dir / d["digest"].split(":")[1] for d in [man["config"], *man["layers"]]]
        ours, cat, skopeo, rss, skopeo_rss = [], [], [], [], []
        for _ in range(self.repeat):
            out = self.fresh("export").with_suffix(".tar")
            cat.append(self.time(["sh", "-c", 'out=$1; shift; cat "$@" > "$out"', "sh", out,
                                  *blobs])[0])
            out.unlink()
            s, m = self.time(["skopeo", "copy", "-q", f"oci:{layout}",
                              f"docker-archive:{out}:bench/{key}:1"])
            skopeo.append(s)
            skopeo_rss.append(m)
            out.unlink()
            s, m = self.time(["datalad", "udocker-export", key, "-o", out], cwd=ds)
            ours.append(s)
            rss.append(m)
            out.unlink()
        self.add(Row(f"export {key}", f"`udocker-export` of {what} to a docker-archive file",
                     ours, "`cat` of its blobs (the floor)", cat, target=1.5,
                     also=[("`skopeo copy oci: docker-archive:`", skopeo)]))
        return rss, skopeo_rss

    def warm_run_rows(self, ds, key):
        """Warm containers-run and the runtime entry point, each vs proot on the same ROOT."""
        self.env["DATALAD_UDOCKER_DIR"] = str(self.fresh("udocker-warm"))
        image = ds / ENV_DIR / key / "image"
        self.run(["datalad", "containers-run", "-n", key, "true"], cwd=ds)   # creates it
        states = list(Path(self.env["DATALAD_UDOCKER_DIR"]).glob(
            "datalad-udocker/containers/*.json"))
        root = Path(json.loads(states[0].read_text())["path"]) / "ROOT"
        entry = [PYTHON, "-m", "datalad_udocker.run.cli", "--dataset", ds, image, "true"]
        rows = {"cr": [], "run": [], "entry": [], "proot": []}
        for _ in range(self.repeat):
            rows["run"].append(self.time(["datalad", "run", f"proot -r {root} /bin/true"],
                                         cwd=ds)[0])
            rows["cr"].append(self.time(["datalad", "containers-run", "-n", key, "true"],
                                        cwd=ds)[0])
            rows["proot"].append(self.time(["proot", "-r", root, "/bin/true"], cwd=ds)[0])
            rows["entry"].append(self.time(entry, cwd=ds)[0])
        del self.env["DATALAD_UDOCKER_DIR"]
        self.add(Row("containers-run warm", f"warm `datalad containers-run -n {key} true` "
                     "(Debian image, P1)", rows["cr"], '`datalad run "proot -r ROOT /bin/true"`',
                     rows["run"], target=1.2))
        self.add(Row("entry point warm", "the runtime entry point (the cmdexec) for `true`, "
                     "warm", rows["entry"], "bare `proot -r ROOT /bin/true`", rows["proot"],
                     kind="delta", target=0.15))

    def first_run_row(self, ds, ref, key, what):
        """Fresh clone, empty cache: clone + get + create + run vs udocker pull + create."""
        bare = self.bare(ds)
        name = ref.split("/", 1)[1]
        registry = "http://" + ref.split("/", 1)[0]
        ours, yard, other = [], [], []
        for i in range(self.repeat):
            udir = self.fresh("udocker-yard")
            pull, uenv = self.udocker(udir, "pull", f"--registry={registry}", name)
            create, _ = self.udocker(udir, "create", f"--name=bench{i}", name)
            yard.append(self.time(chained(pull, create), env=uenv)[0])
            shutil.rmtree(udir, ignore_errors=True)
            for base, samples in [(self.compare_env, other), (self.env, ours)]:
                if base is None:
                    continue
                clone = self.fresh("clone")
                env = dict(base, DATALAD_UDOCKER_DIR=str(self.fresh("udocker-cold")))
                samples.append(self.time(["sh", "-c", 'datalad clone "$1" "$2" && cd "$2" && '
                                          'datalad containers-run -n "$3" true', "sh", bare,
                                          clone, key], env=env)[0])
                shutil.rmtree(clone)
                shutil.rmtree(env["DATALAD_UDOCKER_DIR"], ignore_errors=True)
        self.add(Row(f"first run {key}", f"first run in a fresh clone with an empty cache "
                     f"(clone + get + create + run), {what}", ours,
                     "`udocker pull` + `udocker create`", yard, target=1.0,
                     also=self.compared(other)))

    def create_row(self, ds, ref, key, what):
        """Empty cache, layers present: our first run (verify, check, extract, run) vs
        ``udocker create`` of the image it pulled itself (pull not timed)."""
        name = ref.split("/", 1)[1]
        udir = self.fresh("udocker-yard")
        pull, uenv = self.udocker(udir, "pull", f"--registry=http://{ref.split('/')[0]}", name)
        self.run(pull, cwd=self.work, env=uenv)
        image = ds / ENV_DIR / key / "image"
        ours, yard = [], []
        for i in range(self.repeat):
            create, _ = self.udocker(udir, "create", f"--name=small{i}", name)
            yard.append(self.time(create, env=uenv)[0])
            env = dict(self.env, DATALAD_UDOCKER_DIR=str(self.fresh("udocker-cold")))
            ours.append(self.time(["datalad-udocker-run", "--dataset", ds, image, "true"],
                                  cwd=ds, env=env)[0])
            shutil.rmtree(env["DATALAD_UDOCKER_DIR"], ignore_errors=True)
        shutil.rmtree(udir, ignore_errors=True)
        self.add(Row(f"create {key}", f"first run with the layers present and an empty cache "
                     f"(verify + create + run), {what}", ours,
                     "`udocker create` (pulled before)", yard))


def chained(*cmds):
    """``sh -c`` argv that runs each argv in ``cmds`` in turn, stopping at the first failure."""
    script = " && ".join(" ".join(f'"${{{i}}}"' for i in range(start, start + len(c)))
                         for start, c in _starts(cmds))
    return ["sh", "-c", script, "sh", *[a for c in cmds for a in map(str, c)]]


def _starts(cmds):
    start = 1
    for c in cmds:
        yield start, c
        start += len(c)


def machine():
    load = os.getloadavg()
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cs",
                             "--", "datalad_udocker"],
                            capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            f"at the end; code under test: datalad_udocker/ as of commit {commit}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small images, 1 repeat: a smoke run")
    ap.add_argument("--repeat", type=int, default=None, help="repeats per measurement (3)")
    ap.add_argument("--out", default=None, help="directory for results.md, the .rst.inc and "
                    "the PNG (default: the repository's; with --quick a temp dir)")
    ap.add_argument("--compare", default=None, metavar="VENV",
                    help="also measure the import, clone+get and first-run rows with the "
                    "datalad, git-annex-remote-udocker and datalad-udocker-run of another "
                    "install (e.g. a venv of the code before a change), in the same repeats: "
                    "before/after in one run")
    ap.add_argument("--rows", default=None, metavar="R,...",
                    help="measure only these rows (%s); the images and datasets they need "
                    "are made untimed" % ", ".join(ROWS))
    args = ap.parse_args()
    rows = set(args.rows.split(",")) if args.rows else set(ROWS)
    if rows - set(ROWS):
        ap.error("unknown rows: %s (known: %s)" % (", ".join(sorted(rows - set(ROWS))),
                                                   ", ".join(ROWS)))
    repeat = args.repeat or (1 if args.quick else 3)
    big_mib = [2] * 10 if args.quick else [102] * 6 + [103] * 4
    small_files = 500 if args.quick else 20000
    started = time.time()
    # what `pip install` leaves: bytecode for every module.  The editable install under
    # PYTHONDONTWRITEBYTECODE (set on these machines) would otherwise compile the package
    # anew in every process: ~40 ms per command, ~10 ms per start of the special remote
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "datalad_udocker")],
                   check=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
    work = Path(tempfile.mkdtemp(prefix="bench-all-"))
    reg = Registry("plain").start()
    suite = Suite(work, repeat, args.compare)
    try:
        log(f"registry on {reg.host}; work dir {work}; building images")
        if rows & {"import-big", "clone-get", "clone-get-cached", "export"}:
            big, big_size = push_image(reg, random_image, "bench/big", layer_mib=big_mib)
            big_what = f"the {big_size / 2**20:.0f} MiB 10-layer image"
            log(f"image big: {big_size / 2**20:.0f} MiB (compressed)")
        if rows & {"import-small", "create-small"}:
            small, small_size = push_image(reg, small_files_image, "bench/small",
                                           files=small_files)
            small_what = f"the {small_files} small files image ({small_size / 2**20:.0f} MiB)"
            log(f"image small: {small_size / 2**20:.1f} MiB (compressed)")
        if rows & {"warm-run", "first-run"}:
            deb, deb_size = push_image(reg, debian_image, "bench/deb", quick=args.quick)
            deb_what = f"the Debian image ({deb_size / 2**20:.0f} MiB)"
            log(f"image debian: {deb_size / 2**20:.1f} MiB (compressed)")
        log(f"measuring {', '.join(r for r in ROWS if r in rows)}; {repeat} repeat(s)")
        if rows & {"import-big", "clone-get", "clone-get-cached", "export"}:
            if "import-big" in rows:
                big_ds, import_rss, skopeo_rss = suite.import_rows(big, big_what, "big")
            else:
                big_ds = suite.imported(big, "big")
            if "clone-get" in rows:
                suite.clone_get_row(big_ds, big, "big", big_what)
            if "clone-get-cached" in rows:
                suite.clone_get_cached_row(big_ds, "big", big_what)
            if "export" in rows:
                export_rss, skopeo_export_rss = suite.export_rows(big_ds, "big", big_what)
            shutil.rmtree(big_ds)
        if rows & {"warm-run", "first-run"}:
            deb_ds = suite.imported(deb, "deb")
            if "warm-run" in rows:
                suite.warm_run_rows(deb_ds, "deb")
            if "first-run" in rows:
                suite.first_run_row(deb_ds, deb, "deb", deb_what)
        if rows & {"import-small", "create-small"}:
            if "import-small" in rows:
                small_ds, _, _ = suite.import_rows(small, small_what, "small")
            else:
                small_ds = suite.imported(small, "small")
            if "create-small" in rows:
                suite.create_row(small_ds, small, "small", small_what)
        if "import-big" in rows:
            suite.add(Row("peak RSS import", f"peak RSS of `udocker-import`, {big_what}",
                          import_rss, "skopeo copy", skopeo_rss, kind="rss", target=150))
        if "export" in rows:
            suite.add(Row("peak RSS export", f"peak RSS of `udocker-export`, {big_what}",
                          export_rss, "skopeo copy to docker-archive", skopeo_export_rss,
                          kind="rss", target=150))
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.time() - started) / 60
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    kind = "Quick smoke run" if args.quick else "Run" if args.rows is None else \
        "Run of rows " + ", ".join(r for r in ROWS if r in rows)
    preamble = (f"{kind} of {when}, {repeat} repeat(s), "
                f"{minutes:.1f} min in all; {machine()}.")
    write(suite.rows, preamble, args)


def write(rows, preamble, args):
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick or args.rows else None)
    md_path = (out or REPO / "benchmarks") / "results.md"
    static = out or REPO / "docs" / "_static"
    static.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, preamble)
    md_path.write_text(md)
    md_path.with_suffix(".json").write_text(json.dumps(
        {"run": preamble, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    (static / "benchmarks.rst.inc").write_text(rst_list_table(rows, preamble))
    plot(rows, static / "benchmarks.png", "datalad-udocker vs the tools users would pick "
         "instead, same run (" + preamble.split(";")[0] + ")")
    print()
    print(md)
    print(f"written: {md_path} (and .json: the samples), {static / 'benchmarks.rst.inc'}, "
          f"{static / 'benchmarks.png'}")


if __name__ == "__main__":
    sys.exit(main())
