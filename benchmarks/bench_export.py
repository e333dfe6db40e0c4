"""Export speed and memory: datalad udocker-export vs skopeo copy oci: -> docker-archive:, tar.

    .venv/bin/python benchmarks/bench_export.py [--mib 40,40,40]

The image is imported once from a local registry; then each tool writes a docker-archive
(or, for tar, a plain archive of the layout, following the annex symlinks) of the same
image in this run.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import git_identity_env, imported_dataset, measure, start_registry_with_image, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="40,40,40", help="sizes of the random layers in MiB")
    args = ap.parse_args()
    reg, ref, total = start_registry_with_image(tuple(int(m) for m in args.mib.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    env = git_identity_env()
    try:
        ds, layout = imported_dataset(work, ref, env)
        print(f"image {ref}: {total / 2**20:.1f} MiB compressed")
        rows = [
            ("skopeo copy oci: -> docker-archive:", *measure(
                ["skopeo", "copy", "-q", f"oci:{layout}", f"docker-archive:{work / 's.tar'}"])),
            ("tar -ch (layout, no format work)", *measure(
                ["tar", "-chf", str(work / "t.tar"), "-C", str(layout), "."])),
            ("datalad udocker-export -o FILE", *measure(
                ["datalad", "udocker-export", "big", "-o", str(work / "d.tar")], cwd=ds,
                env=env)),
        ]
        table(rows, "skopeo copy oci: -> docker-archive:")
        for name in ("s.tar", "t.tar", "d.tar"):
            print(f"  {name}: {(work / name).stat().st_size / 2**20:.1f} MiB")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
