"""Container start-up: datalad-udocker's runtime vs udocker's own pull/create/run, and the host.

    .venv/bin/python benchmarks/bench_run.py [--mib 40] [--execmode P1]

Same image, same machine, same run.  "first run" includes feeding the annexed layers to
udocker and creating (extracting) the container; "second run" reuses it.  The udocker rows
do the same steps with udocker's CLI on an image it pulled itself from the same registry.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import (UDOCKER_ROOT_OPTS, git_identity_env, imported_dataset, measure,
                    start_registry_with_image, table, udocker_env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="40", help="sizes of the random layers in MiB")
    ap.add_argument("--execmode", default="P1")
    args = ap.parse_args()
    reg, ref, total = start_registry_with_image(tuple(int(m) for m in args.mib.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    env = git_identity_env()
    env["DATALAD_UDOCKER_DIR"] = str(work / "ours")
    env["DATALAD_UDOCKER_EXECMODE"] = args.execmode
    try:
        ds, layout = imported_dataset(work, ref, env)
        print(f"image {ref}: {total / 2**20:.1f} MiB compressed, mode {args.execmode}")
        run = ["datalad-udocker-run", "--dataset", str(ds), "--execmode", args.execmode,
               str(layout), "true"]
        rows = [("host: sh -c true", *measure(["sh", "-c", "true"]))]
        rows.append(("datalad-udocker-run, first run (create)", *measure(run, cwd=ds, env=env)))
        rows.append(("datalad-udocker-run, second run (reuse)", *measure(run, cwd=ds, env=env)))
        uenv = udocker_env(env, work / "udocker")
        name = ref.split("/", 1)[1]
        steps = [("udocker pull (same registry)", ["pull", f"--registry={reg.url}", name]),
                 ("udocker create", ["create", "--name=bench", name]),
                 ("udocker run (existing container)", ["run", "--nobanner", "bench", "true"])]
        for label, cmd in steps:
            try:
                rows.append((label, *measure(["udocker", *UDOCKER_ROOT_OPTS, *cmd], env=uenv,
                                             cwd=work)))
            except SystemExit as exc:
                print(f"({label} failed here: {exc})")
                break
        table(rows, "datalad-udocker-run, second run (reuse)")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
