"""Every command says what it did, or why it did nothing, in DataLad's result style.

Through the real commands (``datalad.api`` and the ``datalad`` command line) against the real
test registry: import messages and statuses (notneeded shown, the platform named, a missing
tag told from a missing repository, user mistakes ``impossible`` with the exception carried),
the command summaries in ``datalad --help``, and, as the non-root user with a fresh HOME, the
container listing with sizes, prunes that remove something and nothing, a udocker directory
switched away from, and no ``~/.udocker``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from checks import imp
from fixtures.users import UserRunner

pytestmark = pytest.mark.timeout(300)


def cli(*args, cwd):
    return subprocess.run(["datalad", *args], cwd=cwd, capture_output=True, text=True)


# --- udocker-import -------------------------------------------------------------------------
def test_import_says_what_it_did(ds, registry):
    ref = registry.images["test/multi:1"].reference
    res = imp(ds, ref)
    assert res["status"] == "ok" and res["platform"] == "linux/amd64", res
    assert res["message"].startswith("stored ") and "platform linux/amd64" in res["message"]
    # the same image again: notneeded, and the default (tailored) rendering shows it
    again = cli("udocker-import", ref, cwd=ds.path)
    assert again.returncode == 0, again.stderr
    line, = [ln for ln in again.stdout.splitlines() if "udocker_import" in ln]
    assert "notneeded" in line and "already stored" in line and "platform linux/amd64" in line
    # a multi-platform image: the chosen platform is said and recorded
    multi = registry.images["test/multiarch:1"].reference
    res = imp(ds, multi, name="arm", platform="linux/arm64")
    assert res["status"] == "ok" and res["platform"] == "linux/arm64", res
    assert "platform linux/arm64" in res["message"]
    res = imp(ds, multi, name="native")
    assert res["platform"] == "linux/amd64" and "platform linux/amd64" in res["message"]


def test_missing_tag_or_repository(ds, registry):
    host = registry.host
    res = imp(ds, f"{host}/test/multi:9")
    assert res["status"] == "impossible", res
    assert res["message"] == f"{host}/test/multi has no tag '9'; its tags: 1, 2", res
    res = imp(ds, f"{host}/test/mutli:1")
    assert res["status"] == "impossible", res
    assert res["message"].startswith(f"repository {host}/test/mutli not found"), res
    assert "check the image name" in res["message"]
    digest = "sha256:" + "0" * 64
    res = imp(ds, f"{host}/test/multi@{digest}")
    assert res["status"] == "impossible", res
    assert res["message"].startswith(f"{host}/test/multi has no manifest {digest}; its tags: ")
    # on the command line: one line naming the missing tag, exit code 1
    out = cli("udocker-import", f"{host}/test/multi:9", cwd=ds.path)
    assert out.returncode == 1
    assert "udocker_import(impossible)" in out.stdout and "has no tag '9'" in out.stdout


@pytest.mark.parametrize("ref,kw,words", [
    ("{host}/Bad//Ref", {}, "invalid"),
    ("{host}/test/multiarch:1", {"platform": "linux/s390x"}, "no image for platform"),
    ("{host}/test/multiarch:1", {"platform": "s390x"}, "invalid platform"),
])
def test_user_mistakes_are_impossible(ds, registry, ref, kw, words):
    res = imp(ds, ref.format(host=registry.host), **kw)
    assert res["status"] == "impossible", res
    assert words in res["message"].lower() or words in res["message"], res
    assert res["exception"] is not None and "error_message" in res
    assert res["action"] == "udocker_import" and res["path"] == ds.path


def test_help_summaries_are_plain_text(tmp_path):
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ours = out.stdout[out.stdout.index("udocker-import"):]
    ours = ours[:ours.index("*General information*")]
    assert "udocker-export" in ours and "udocker-containers" in ours
    assert "``" not in ours, ours


def test_export_unknown_name_is_impossible(ds):
    res = ds.udocker_export("nosuch", result_renderer="disabled", return_type="list",
                            on_failure="ignore")
    assert [r["status"] for r in res] == ["impossible"], res
    assert "nosuch is neither a container" in res[0]["message"] and res[0]["exception"]


# --- udocker-containers, as a non-root user with a fresh HOME -------------------------------
@pytest.fixture
def fresh_user(nonroot):
    """The non-root user with a HOME of its own (nothing cached, no config but git's)."""
    user = UserRunner(home=nonroot.make_tempdir("udtest-fresh-home-"))
    yield user
    shutil.rmtree(user.home, ignore_errors=True)


def lines_with(text, word):
    return [ln for ln in text.splitlines() if word in ln]


def test_containers_listing_and_prune(fresh_user, registry):
    user, home = fresh_user, fresh_user.home
    ref = registry.images["test/single:1"].reference
    user.run(["datalad", "create", "ds"])
    ds = home / "ds"
    user.run(["datalad", "udocker-import", ref], cwd=ds)
    udir = home / ".cache" / "datalad-udocker" / "udocker"

    def containers(*args, fmt=()):
        return user.run(["datalad", *fmt, "udocker-containers", *args], cwd=ds).stdout

    # nothing cached yet: said, not silent; a prune that removes nothing says so too
    assert lines_with(containers(), "udocker_containers(notneeded)") == [
        f"udocker_containers(notneeded): {udir} (directory) [no cached containers]"]
    assert lines_with(containers("--prune"), "udocker_prune(notneeded)") == [
        f"udocker_prune(notneeded): {udir} (directory) [nothing to prune: no cached "
        "containers]"]

    user.run(["datalad", "containers-run", "-n", "single", "true"], cwd=ds)
    records = [json.loads(ln) for ln in
               containers(fmt=("-f", "json")).splitlines() if ln.startswith("{")]
    assert [(r["action"], r["status"], r["execmode"]) for r in records] == [
        ("udocker_containers", "ok", "P1")]
    size = records[0]["size"]
    du = subprocess.run(["du", "-s", "-B1", records[0]["path"]], capture_output=True,
                        text=True, check=True)
    assert size > 100_000 and abs(size - int(du.stdout.split()[0])) <= 4096, (size, du.stdout)
    human = f"{size / 1024 ** 2:.1f} MB"            # DataLad's bytes2human
    listing = containers()
    assert lines_with(listing, "P1 ")[0].split()[2:4] == human.split(), listing
    assert f"1 cached container(s), {human} in total, in {udir}" in listing

    # --older-than that matches nothing: notneeded, exit 0, the container kept
    out = containers("--prune", "--older-than", "1")
    assert lines_with(out, "udocker_prune(notneeded)") == [
        f"udocker_prune(notneeded): {udir} (directory) [nothing to prune: all 1 cached "
        "container(s) were used in the last 1 day(s)]"], out
    assert containers(fmt=("-f", "json")).count('"status": "ok"') == 1
    # --older-than without --prune: impossible, exit 1
    res = user.run(["datalad", "udocker-containers", "--older-than", "1"], cwd=ds, check=False)
    assert res.returncode == 1 and "udocker_containers(impossible)" in res.stdout, res

    # another udocker directory configured: the old one is pointed at, not forgotten
    user.run(["git", "config", "--global", "datalad.udocker.dir", str(home / "other")])
    out = containers()
    assert lines_with(out, "udocker_dirs(ok)") == [
        f"udocker_dirs(ok): {udir} (directory) [1 cached container(s) in a udocker directory "
        f"used before (not {home / 'other'}): list or prune them with "
        f"DATALAD_UDOCKER_DIR={udir} datalad udocker-containers]"], out
    user.run(["git", "config", "--global", "--unset", "datalad.udocker.dir"])

    # prune: says what it removed and what that freed
    out = containers("--prune")
    assert re.search(rf"udocker_prune\(ok\): {udir}/containers/\S+ \(directory\) "
                     rf"\[removed, {re.escape(human)} freed\]", out), out
    assert f"removed 1 container(s), freed {human}, in {udir}" in out
    assert "no cached containers" in containers("--prune")
    # udocker never made its ~/.udocker
    assert not (home / ".udocker").exists()
