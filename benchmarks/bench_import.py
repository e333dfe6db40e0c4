"""Import speed and memory: datalad udocker-import vs skopeo copy, udocker pull, curl.

    .venv/bin/python benchmarks/bench_import.py [--mib 40,40,40]

All tools pull the same image from the same local registry in this run.  The import does
more than the others (git-annex keys, URL registration, a commit); the ratio shows its cost.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests

from common import git_identity_env, measure, start_registry_with_image, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="40,40,40", help="sizes of the random layers in MiB")
    args = ap.parse_args()
    reg, ref, total = start_registry_with_image(tuple(int(m) for m in args.mib.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    env = git_identity_env()
    try:
        print(f"image {ref}: {total / 2**20:.1f} MiB compressed")
        rows = []
        rows.append(("skopeo copy docker:// -> oci:", *measure(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{work / 'skopeo'}:1"])))
        name, tag = ref.split("/", 1)[1].rsplit(":", 1)
        manifest = requests.get(f"{reg.url}/v2/{name}/manifests/{tag}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        urls = [f"{reg.url}/v2/{name}/blobs/{b['digest']}"
                for b in [manifest["config"], *manifest["layers"]]]
        (work / "curl").mkdir()
        rows.append(("curl (blobs, sequential, no checks)", *measure(
            ["curl", "-sf", "--parallel-max", "1", *[a for i, u in enumerate(urls)
                                                 for a in ("-o", str(work / "curl" / str(i)), u)]])))
        udir = work / "udocker"
        uenv = dict(env, UDOCKER_DIR=str(udir), UDOCKER_TARBALL="")
        try:
            rows.append(("udocker pull", *measure(
                ["udocker", "--allow-root", "pull", f"--registry={reg.url}", f"{name}:{tag}"],
                env=uenv)))
        except SystemExit as exc:
            print(f"(udocker pull could not run here: {exc})")
        subprocess.run(["datalad", "create", str(work / "ds")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        rows.append(("datalad udocker-import", *measure(
            ["datalad", "udocker-import", ref], cwd=work / "ds", env=env)))
        subprocess.run(["datalad", "create", str(work / "ds2")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        rows.append(("datalad udocker-import (jobs=1)", *measure(
            ["datalad", "-c", "datalad.udocker.jobs=1", "udocker-import", ref],
            cwd=work / "ds2", env=env)))
        table(rows, "skopeo copy docker:// -> oci:")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
