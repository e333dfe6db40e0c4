"""docs/hpc.rst's walkthrough, run exactly as printed: from nothing to a rerun of a Slurm job.

The commands are read from the document itself: its ``code-block`` directives with
``:class: walkthrough`` (commands, run in order in one bash shell, as a user types them) and
``:class: walkthrough-file`` (a file the user writes, at the path in its ``:caption:``), so
the document and the test cannot drift apart.  Only the placeholders the document lists
(:data:`PLACEHOLDERS`) are replaced: the clone to install from, the tools tarball, the
scratch directory and the image reference.  pip is kept offline by its own environment
variables (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``: the wheelhouse of the root-free install
test), and ``sbatch`` finds the test cluster through ``SLURM_CONF``, not by changing
the commands.

They run as the non-root user with a fresh HOME and ``PATH=/usr/bin:/bin`` in a mount
namespace without the system's git-annex, PRoot, runc, patchelf and fakechroot
(tests/fixtures/rootfree.py), and the batch script goes to a real Slurm cluster whose node
(slurmd, hence every job) lacks them too.  Checked afterwards: the job ran on that node and
installed the tools from the tarball, the run is recorded with a command that names no
install, its output is right, and both reruns (in place and in a fresh clone) reproduce it
without a new commit.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fixtures.rootfree import HiddenToolsUser, without_tools
from fixtures.slurm import SlurmCluster, slurm_unavailable_reason
from fixtures.util import REPO_ROOT

pytestmark = pytest.mark.timeout(900)

DOC = REPO_ROOT / "docs" / "hpc.rst"
# what the document says to replace, and what the test replaces it with (format fields:
# the test's clone, tarball, scratch directory and registry)
PLACEHOLDERS = {
    "/path/to/datalad-udocker": "{clone}",
    "/shared/sw/udocker/udocker-englib-1.2.11.tar.gz": "{tarball}",
    "/scratch/$USER": "{scratch}/$USER",
    "registry.example.org/tools/busybox:1.36": "{registry}/test/single:1",
}
DIRECTIVE = re.compile(r"^\.\. code-block:: bash\n((?:   :\w+: .*\n)+)\n((?:   .*\n|\n)+)",
                       re.M)


def walkthrough_blocks(text: str):
    """``(kind, caption, body)`` of each marked code block, in document order."""
    blocks = []
    for m in DIRECTIVE.finditer(text):
        options = dict(re.findall(r"   :(\w+): (.*)\n", m.group(1)))
        if options.get("class") not in ("walkthrough", "walkthrough-file"):
            continue
        body = "".join(ln[3:] + "\n" if ln else "\n"
                       for ln in m.group(2).rstrip("\n").split("\n"))
        blocks.append((options["class"], options.get("caption"), body))
    return blocks


def walkthrough_script(text: str, values: dict) -> str:
    """One bash script: the command blocks as they are, each file block as a here-document
    written to its caption's path; the placeholders replaced."""
    parts = []
    for kind, caption, body in walkthrough_blocks(text):
        if kind == "walkthrough":
            parts.append(body)
        else:
            assert caption, "a walkthrough-file block needs a :caption: naming the file"
            assert "WALKTHROUGH_EOF" not in body
            parts.append(f"cat > {caption} <<'WALKTHROUGH_EOF'\n{body}WALKTHROUGH_EOF\n")
    script = "\n".join(parts)
    for placeholder, value in PLACEHOLDERS.items():
        assert placeholder in script, f"docs/hpc.rst no longer uses {placeholder!r}"
        script = script.replace(placeholder, value.format(**values))
    return script


def test_the_walkthrough_is_extracted():
    """The blocks are found, in order, and cover every step the issue asks for."""
    blocks = walkthrough_blocks(DOC.read_text())
    text = "".join(body for _, _, body in blocks)
    files = [caption for kind, caption, _ in blocks if kind == "walkthrough-file"]
    assert files == ["~/analysis-job.sh"]
    for step in ("python3 -m venv", "pip install", "datalad create", "datalad udocker-import",
                 "sbatch", "datalad containers-run", "datalad rerun", "datalad clone"):
        assert step in text, step
    assert text.index("pip install") < text.index("udocker-import") < text.index("sbatch") \
        < text.index("datalad rerun")
    # the batch script calls datalad by its absolute path (no activated venv in a job)
    script = next(body for kind, _, body in blocks if kind == "walkthrough-file")
    assert "~/venvs/dl/bin/datalad containers-run" in script and "activate" not in text


@pytest.fixture(scope="module")
def toolless_slurm():
    """A Slurm cluster whose node has none of the system's git-annex, PRoot, runc..."""
    reason = slurm_unavailable_reason()
    if reason:
        pytest.fail(f"no Slurm cluster: {reason}", pytrace=False)
    cluster = SlurmCluster(cpus=2, node_wrapper=without_tools).start()
    yield cluster
    cluster.stop()


def last_record(user, ds):
    msg = user.run(f"git -C {ds} log -1 --format=%B").stdout
    return json.loads(re.search(r"=== Do not change lines below ===\n(.*)\n\^\^\^",
                                msg, re.S).group(1))


def test_walkthrough_as_printed(nonroot, registry, readonly_clone, wheelhouse, tools_tarball,
                                toolless_slurm):
    base = nonroot.make_tempdir("udtest-walkthrough-")
    try:
        user = HiddenToolsUser(nonroot, base)
        scratch = base / "scratch"
        (scratch / nonroot.user).mkdir(parents=True)   # a cluster's scratch has one per user
        nonroot.chown(scratch / nonroot.user)
        script = walkthrough_script(DOC.read_text(), {
            "clone": readonly_clone, "tarball": tools_tarball, "scratch": scratch,
            "registry": registry.host})
        path = base / "walkthrough.sh"
        path.write_text(script)
        env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", **toolless_slurm.env}
        res = user.run(f"bash -ex {path}", env=env, check=False, timeout=800)
        assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-6000:]}"
        home, udir = user.home, scratch / nonroot.user / "udocker"
        ds, check = home / "analysis", home / "analysis-check"

        # the job ran on the node without tools: it installed them from the tarball
        out, = home.glob("analysis-*.out")
        log = out.read_text()
        assert f"installing udocker's tools (PRoot, runc, Fakechroot, patchelf) from " \
            f"{tools_tarball} into {udir}" in log, log
        assert (udir / "bin" / "proot-x86_64").exists()
        # git-annex came from the wheel, and is not on the user's PATH
        assert (home / "venvs/dl/bin/git-annex").exists()
        assert user.run("command -v git-annex || echo none").stdout == "none\n"
        # the recorded run: right output, a command naming no install, images by path
        assert (ds / "count.txt").read_text() == "5\n"
        assert (check / "count.txt").read_text() == "5\n"
        record = last_record(user, ds)
        assert record["cmd"].startswith("datalad-udocker-run "), record
        assert str(home) not in record["cmd"] and "python" not in record["cmd"]
        assert record["outputs"] == ["count.txt"] and record["inputs"] == ["words.txt"]
        assert ".datalad/environments/busybox/image" in record["extra_inputs"]
        user.path = f"{home}/venvs/dl/bin:{user.path}"       # for git's annex filter
        # both reruns reproduced it: no new commit, nothing changed
        for where in (ds, check):
            assert user.run(f"git -C {where} status --porcelain").stdout == ""
            assert "[DATALAD RUNCMD]" in user.run(f"git -C {where} log -1 --format=%B").stdout
        assert user.run(f"git -C {check} rev-parse HEAD").stdout == \
            user.run(f"git -C {ds} rev-parse HEAD").stdout
        # the two reruns really ran the command (the job's run is in its own log)
        reruns = res.stderr[res.stderr.index("] run commit "):]
        assert reruns.count("] run commit ") == reruns.count("== Command start") == 2, reruns
    finally:
        shutil.rmtree(base, ignore_errors=True)
