"""The main job on a built-in example, end to end, with the commands a user would type.

Starts a registry on 127.0.0.1, pushes a tiny busybox image to it, imports it into a new
dataset, clones the dataset (git only), gets the layers back from the registry and runs a
command in the container with `datalad containers-run`.  Everything is left in DEMO_DIR
(default ./demo-output) for you to look at; the registry is stopped at the end, and the demo
says how to start it again (tests/test_demo.py checks what it says).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"

from fixtures import images as im  # noqa: E402
from fixtures.registry import REGISTRY_BIN, Registry  # noqa: E402


def sh(cmd, cwd):
    print(f"\n$ cd {cwd} && {cmd}", flush=True)
    subprocess.run(cmd, shell=True, cwd=cwd, check=True)


def main():
    out = Path(os.environ.get("DEMO_DIR", REPO / "demo-output")).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env_git = {"GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@example.org",
               "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@example.org"}
    for k, v in env_git.items():
        os.environ.setdefault(k, v)
    print(f"== starting a registry and pushing demo/hello:1 (workdir {out})")
    reg = Registry("plain", workdir=out / "registry").start()
    try:
        layers = [im.make_layer(im.busybox_rootfs()),
                  im.make_layer({"etc/hello": b"hello from a versioned container image\n"})]
        im.build_image(out / "image-src", "src", layers, cmd=["cat", "/etc/hello"],
                       env=[f"PATH={im.DEFAULT_PATH}", "GREETING=hi"])
        reg.push(out / "image-src", "src", "demo/hello", "1")
        ref = f"{reg.host}/demo/hello:1"
        sh("datalad create project", out)
        project = out / "project"
        sh(f"datalad udocker-import {ref}", project)
        sh("git annex whereis .datalad/environments/hello/image/blobs", project)
        sh("datalad containers-list", project)
        print("\n== publishing the dataset as a bare git repository WITHOUT annexed content,"
              "\n   as on a git hosting site: a clone of it must get the layers from the registry")
        sh("git clone -q --bare project project.git && "
           "git -C project.git fetch -q ../project git-annex:git-annex && "
           "git -C project.git remote remove origin", out)
        sh("datalad clone project.git clone", out)
        clone = out / "clone"
        sh("datalad get .datalad/environments/hello", clone)
        cmd = "sh -c 'cat /etc/hello > out.txt; echo greeting=$GREETING >> out.txt'"
        sh(f"datalad containers-run -n hello -o out.txt {shlex.quote(cmd)}", clone)
        sh("cat out.txt && git log --oneline -3", clone)
        print(f"\n== done: dataset {project}, clone {clone}")
        print("   The demo registry stops now.  In these datasets the layers that are present"
              "\n   stay usable (containers-run works), but `datalad get` of a layer that is not"
              "\n   present (dropped, or in a new clone) needs the registry again: restart it with"
              f"\n   `{REGISTRY_BIN} serve {reg.config_path}` (it serves {reg.host} again),"
              "\n   or import your own images from a registry of your own.")
    finally:
        reg.stop()


if __name__ == "__main__":
    main()
