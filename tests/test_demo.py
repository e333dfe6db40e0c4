"""tools/demo.py (what tools/quickstart.sh ends with) explains its steps and what it leaves.

The demo is run as a user runs it.  Its output explains the bare-clone step before running it,
and at the end says that its registry stops, what still works, and how to restart it.  Each
of these claims is then tried on the datasets it left: a run with the layers present works
with the registry stopped; a dropped layer cannot be got; after the restart command the demo
printed, it can.

docs/quickstart.rst's "Share and get back" is tried on the demo's clone too: ``datalad push``
to a plain bare git repository sends the history only, to a sibling with an annex the
layers as well.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import requests

from fixtures.util import REPO_ROOT, stop_process, wait_until

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]     # starts a registry


def sh(cmd, cwd, check=True):
    res = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's output directory and its standard output."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "demo.py")],
                         env={**os.environ, "DEMO_DIR": str(out)}, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res.stdout


def test_demo_explains_its_steps_and_what_it_leaves(demo, tmp_path):
    out, text = demo
    # the bare clone is explained before it is made
    before = text[:text.index("git clone -q --bare project project.git")]
    assert "bare git repository WITHOUT annexed content" in before
    assert "must get the layers from the registry" in before
    # the end says the registry stops, what still works, and how to restart it
    end = text[text.index("== done"):]
    assert "The demo registry stops now" in end
    restart = re.search(r"restart it with\s+`([^`]+)`", end).group(1)
    host = re.search(r"it serves (\S+) again", end).group(1)

    clone = out / "clone"
    # present layers stay usable: a run with the registry stopped
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{host}/v2/", timeout=5)
    sh("datalad containers-run -n hello -o again.txt \"sh -c 'cat /etc/hello > again.txt'\"",
       clone)
    assert (clone / "again.txt").read_text() == "hello from a versioned container image\n"
    # a layer that is not present cannot be got while the registry is stopped...
    image = ".datalad/environments/hello/image"
    sh(f"git annex drop --force {image}/blobs", clone)
    res = sh(f"datalad get {image}", clone, check=False)
    assert res.returncode != 0, res.stdout
    # ...and can after the command the demo printed
    proc = subprocess.Popen(shlex.split(restart), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: requests.get(f"http://{host}/v2/", timeout=5).ok, 30,
                   what="the demo registry to serve again", proc=proc)
        sh(f"datalad get {image}", clone)
        sh("git annex fsck -q .datalad/environments/hello/image/blobs", clone)
    finally:
        stop_process(proc)


def test_push_sends_layers_only_to_an_annex(demo):
    """docs/quickstart.rst: history only to a plain git host, layers too to an annex."""
    out, _ = demo
    clone = out / "clone"
    sh("git init -q --bare ../plain.git && git init -q --bare ../annexed.git && "
       "git -C ../annexed.git annex init -q store", clone)
    sh("git remote add plain ../plain.git && git remote add annexed ../annexed.git", clone)
    sh("datalad get .datalad/environments/hello/image", clone, check=False)
    present = sh("git annex find --format='${key}\\n' .datalad/environments/hello/image",
                 clone).stdout.split()
    assert present, "the demo's clone has no layers to push"
    for sibling in ("plain", "annexed"):
        sh(f"datalad push --to {sibling}", clone)
        assert sh(f"git -C ../{sibling}.git rev-parse master", clone).stdout == \
            sh("git rev-parse HEAD", clone).stdout
    def objects(repo):
        return sorted(p.name for p in (out / repo / "annex" / "objects").rglob("*")
                      if p.is_file())
    assert objects("plain.git") == []
    assert set(present) <= set(objects("annexed.git"))          # the layers among them
