"""The udocker runtime on OCI layouts built in Python, run as a non-root user.

Real udocker, PRoot, Fakechroot and runc (Debian's); every container runs as
the ``nonroot`` user through the ``datalad-udocker-run`` entry point (what
containers-run calls) or the Python API.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fixtures import images as im
from fixtures.catalogue import ENV_PATH, multi_layers
from fixtures.util import REPO_ROOT
from fixtures.users import udocker_dir_fixture  # noqa: E402

PY = str(REPO_ROOT / ".venv" / "bin" / "python")


def build(root: Path, name: str, layers, **config) -> Path:
    layout = root / name
    im.build_image(layout, name, layers, **config)
    return layout


@pytest.fixture(scope="session")
def images(nonroot):
    """Single-image OCI layouts (plain files, readable by the non-root user)."""
    root = nonroot.make_tempdir("udtest-images-")
    yield _built_images(root)
    shutil.rmtree(root, ignore_errors=True)


def _built_images(root: Path) -> dict:
    busybox = im.make_layer(im.busybox_rootfs())
    multi_cfg = dict(env=[ENV_PATH, "GREETING=hello", "MULTI_VERSION=1"],
                     entrypoint=["/app/run.sh"], cmd=["default-arg"], workdir="/app")
    return {
        "busybox": build(root, "busybox", [busybox], cmd=["/bin/sh"]),
        "multi": build(root, "multi", multi_layers(1), **multi_cfg),
        "layers1": build(root, "layers1", multi_layers(1), cmd=["/bin/sh"]),
        "layers2": build(root, "layers2", multi_layers(2), cmd=["/bin/sh"]),
        "glibc": build(root, "glibc", [im.make_layer(im.glibc_rootfs())], cmd=["/bin/sh"]),
    }


udir = udocker_dir_fixture("function")


@pytest.fixture
def workdir(nonroot):
    """A directory of the non-root user standing in for a dataset."""
    path = nonroot.make_tempdir("udtest-ds-")
    sub = path / "sub"
    sub.mkdir()
    nonroot.chown(sub)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_cli(nonroot, udir, image, *cmd, mode="P1", dataset=None, cwd=None, path=None,
            entrypoint=None):
    """``datalad-udocker-run`` as the user (with ``path`` as its PATH if given)."""
    argv = ["/usr/bin/env", f"PATH={path}"] if path else []
    argv += [PY, "-m", "datalad_udocker.run.cli", "--execmode", mode]
    if entrypoint:
        argv += ["--entrypoint", entrypoint]
    if dataset is not None:
        argv += ["--dataset", str(dataset)]
    return nonroot.run(argv + [str(image), *cmd], cwd=cwd,
                       env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)


def api(nonroot, udir, code: str):
    """Run Python ``code`` as the user; it must print one JSON document last."""
    res = nonroot.run([PY, "-c", code], env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def cached(nonroot, udir):
    return api(nonroot, udir, (
        "import json, dataclasses; from datalad_udocker.run.cache import ContainerCache\n"
        "print(json.dumps([dataclasses.asdict(c) for c in ContainerCache().containers()]))"))


def udocker_container_dirs(udir: Path):
    cdir = udir / "containers"
    if not cdir.is_dir():
        return []
    return sorted(p.name for p in cdir.iterdir() if not p.is_symlink())


# --- running --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["P1", "P2", "R1"])
def test_output_exit_code_and_no_banners(nonroot, udir, images, mode):
    res = run_cli(nonroot, udir, images["busybox"], "sh", "-c",
                  "echo out; echo err >&2; ls /etc >/dev/null && exit 7", mode=mode)
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
    res = run_cli(nonroot, udir, images["busybox"], "true", mode=mode)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    # udocker never installed its tools tarball: it used the host's tools
    assert not [p for d in ("bin", "lib") if (udir / d).exists() for p in (udir / d).iterdir()]


def test_proot_k_bug_worked_around(nonroot, udir, images):
    """udocker passes -k to PRoot; Debian's PRoot then fails stat/opendir."""
    res = run_cli(nonroot, udir, images["busybox"], "ls", "/etc")
    assert res.returncode == 0, res.stderr
    assert "passwd" in res.stdout.split()
    assert "Invalid argument" not in res.stderr


def test_docker_semantics_entrypoint_cmd_env(nonroot, udir, images):
    # empty command: Entrypoint + Cmd, image Env, WorkingDir without a dataset
    res = run_cli(nonroot, udir, images["multi"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "greeting=hello version=1 cwd=/app args=default-arg\n"
    # arguments replace Cmd, Entrypoint stays
    res = run_cli(nonroot, udir, images["multi"], "a", "b")
    assert res.stdout == "greeting=hello version=1 cwd=/app args=a b\n"


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_whiteouts_and_opaque_dirs(nonroot, udir, images, mode):
    res = run_cli(nonroot, udir, images["layers1"], "sh", "-c",
                  "cd / && find data opaque app -type f | sort", mode=mode)
    assert res.returncode == 0, res.stderr
    expected = sorted(p for p, e in im.flatten([l.spec for l in multi_layers(1)]).items()
                      if p.split("/")[0] in ("data", "opaque", "app")
                      and isinstance(e, (bytes, im.File)))
    assert res.stdout.split() == expected
    assert "data/remove-me.txt" not in expected and "opaque/old1.txt" not in expected


@pytest.mark.parametrize("mode,image", [("P1", "busybox"), ("R1", "busybox"),
                                        ("F1", "glibc")])
def test_dataset_bound_cwd_and_ownership(nonroot, udir, images, workdir, mode, image):
    sub = workdir / "sub"
    res = run_cli(nonroot, udir, images[image], "sh", "-c",
                  "pwd; echo written > out.txt; cat ../ds-file 2>/dev/null || true",
                  mode=mode, dataset=workdir, cwd=sub)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == str(sub)
    out = sub / "out.txt"
    assert out.read_text() == "written\n"
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (nonroot.uid, nonroot.gid)
    # nothing was written into the container instead
    assert not list(udir.glob(f"containers/*/ROOT{sub}/out.txt"))


def test_python_api_captures(nonroot, udir, images, workdir):
    got = api(nonroot, udir, (
        "import json; from datalad_udocker.run.runtime import run_image\n"
        f"code, out, err = run_image({str(images['busybox'])!r}, "
        "'sh -c \"echo $FOO; pwd; echo e >&2; exit 3\"', "
        f"dataset={str(workdir)!r}, cwd={str(workdir)!r}, env={{'FOO': 'bar'}})\n"
        "print(json.dumps([code, out.decode(), err.decode()]))"))
    assert got == [3, f"bar\n{workdir}\n", "e\n"]


def start(argv, **kw) -> subprocess.Popen:
    """Popen in a new session, so that :func:`kill_group` reaches udocker and PRoot too."""
    return subprocess.Popen(argv, start_new_session=True, **kw)


def kill_group(*procs: subprocess.Popen) -> None:
    """SIGKILL what a test started and still runs (use in ``finally``), and reap it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cmdlines_holding(secret: bytes):
    """``pid: argv`` of every process whose command line contains ``secret``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:         # gone meanwhile
                continue
            if secret in cmdline:
                found[proc.name] = cmdline.split(b"\0")
    return found


def _files_holding(root: Path, secret: bytes):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and secret in p.read_bytes()]


def _others_can_read(path: Path) -> bool:
    """Whether a user other than the owner (and not in its group) can read ``path``."""
    if not path.stat().st_mode & 0o004:
        return False
    return all(d.stat().st_mode & 0o001 for d in path.parents)


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_env_values_stay_off_command_lines(nonroot, udir, images, workdir, mode):
    """``run_image(env=...)``: while the command runs, no process shows the value."""
    secret = "s3cr3t-" + os.urandom(8).hex()
    for fifo in ("ready", "go"):
        os.mkfifo(workdir / fifo)
        nonroot.chown(workdir / fifo)
    code = (
        "import json, os; from datalad_udocker.run.runtime import run_image\n"
        f"r = run_image({str(images['busybox'])!r}, ['sh', '-c', "
        "'echo \"$TOKEN\" > ready; read x < go; echo \"got $TOKEN $PLAIN\"'], "
        f"dataset={str(workdir)!r}, cwd={str(workdir)!r}, execmode={mode!r}, "
        "env={'TOKEN': os.environ.pop('TEST_TOKEN'), 'PLAIN': 'visible'})\n"
        "print(json.dumps([r.exit_code, r.stdout.decode(), r.stderr.decode()]))")
    proc = start(
        nonroot.command([PY, "-c", code]), cwd=str(workdir),
        env=nonroot.env({"DATALAD_UDOCKER_DIR": str(udir), "TEST_TOKEN": secret}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # blocks until the command in the container has the value (or the run died)
        reader = subprocess.run(["timeout", "120", "cat", str(workdir / "ready")],
                                capture_output=True, text=True)
        assert reader.stdout == secret + "\n", proc.poll()
        assert _cmdlines_holding(secret.encode()) == {}
        # files holding it meanwhile (runc's spec) are for the user's eyes only
        held = _files_holding(udir, secret.encode())
        assert not [p for p in held if _others_can_read(p)], held
        (workdir / "go").write_text("go\n")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == [0, f"got {secret} visible\n", ""]
        # nor is it left on disk in the udocker directory
        assert _files_holding(udir, secret.encode()) == []
    finally:
        kill_group(proc)


def test_invalid_env_name_refused(nonroot, udir, images):
    res = nonroot.run([PY, "-c", (
        "from datalad_udocker.run.runtime import run_image\n"
        f"run_image({str(images['busybox'])!r}, 'true', env={{'A=B': 'x'}})")],
        env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)
    assert res.returncode != 0
    assert "invalid environment variable name 'A=B'" in res.stderr.splitlines()[-1]


# --- the container cache --------------------------------------------------------------------
def test_second_run_reuses_container(nonroot, udir, images):
    first = run_cli(nonroot, udir, images["busybox"], "sh", "-c", "touch /run-marker")
    assert first.returncode == 0, first.stderr
    dirs = udocker_container_dirs(udir)
    assert len(dirs) == 1
    second = run_cli(nonroot, udir, images["busybox"], "ls", "/run-marker")
    assert second.returncode == 0, second.stderr       # same ROOT: nothing re-extracted
    assert udocker_container_dirs(udir) == dirs
    entries = cached(nonroot, udir)
    assert [e["container_id"] for e in entries] == dirs
    # another mode is another container; a changed image is another container
    assert run_cli(nonroot, udir, images["busybox"], "true", mode="R1").returncode == 0
    assert run_cli(nonroot, udir, images["layers2"], "true").returncode == 0
    assert len(udocker_container_dirs(udir)) == 3
    # the layers were extracted from the layout's blobs, never copied into udocker's store
    for store in ("layers", "repos"):
        assert not (udir / store).exists() or not any((udir / store).rglob("*")), store


def test_concurrent_first_runs_create_once(nonroot, udir, images):
    env = nonroot.env({"DATALAD_UDOCKER_DIR": str(udir)})
    argv = nonroot.command([PY, "-m", "datalad_udocker.run.cli", str(images["layers1"]),
                            "sh", "-c", "echo ok"])
    procs = []
    try:
        for _ in range(3):
            procs.append(start(argv, env=env, cwd=str(nonroot.home), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True))
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    finally:
        kill_group(*procs)
    assert all(r == ("ok\n", "", 0) for r in results), results
    assert len(udocker_container_dirs(udir)) == 1


def test_list_and_prune(nonroot, udir, images):
    assert run_cli(nonroot, udir, images["busybox"], "true").returncode == 0
    assert run_cli(nonroot, udir, images["layers1"], "true").returncode == 0
    entries = cached(nonroot, udir)
    assert {e["execmode"] for e in entries} == {"P1"} and len(entries) == 2
    # a container in use survives a prune (it runs until we write a line to it)
    busy = start(
        nonroot.command([PY, "-m", "datalad_udocker.run.cli", str(images["busybox"]),
                         "sh", "-c", "echo started; read line; echo $line"]),
        env=nonroot.env({"DATALAD_UDOCKER_DIR": str(udir)}), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline() == "started\n"
        got = api(nonroot, udir, (
            "import json; from datalad_udocker.run.cache import ContainerCache\n"
            "removed, busy = ContainerCache().prune()\n"
            "print(json.dumps([[c.image for c in removed], [c.image for c in busy]]))"))
        assert busy.communicate("done\n", timeout=60)[0] == "done\n"
    finally:
        kill_group(busy)
    assert got == [[str(images["layers1"])], [str(images["busybox"])]]
    assert len(udocker_container_dirs(udir)) == 1


def test_udocker_containers_command(nonroot, udir, images):
    assert run_cli(nonroot, udir, images["busybox"], "true").returncode == 0
    assert run_cli(nonroot, udir, images["busybox"], "true", mode="R1").returncode == 0
    call = ("import json; from datalad_udocker.commands.containers_cache import "
            "UdockerContainers as C\n"
            "res = C.__call__(%sresult_renderer='disabled', return_type='list')\n"
            "print(json.dumps([(r['action'], r['status'], r.get('execmode'), r.get('image'))"
            " for r in res]))")
    listed = api(nonroot, udir, call % "")
    assert sorted(listed) == [["udocker_containers", "ok", m, str(images["busybox"])]
                              for m in ("P1", "R1")]
    assert api(nonroot, udir, call % "prune=True, older_than=1, ") == [
        ["udocker_prune", "notneeded", None, None]]
    pruned = api(nonroot, udir, call % "prune=True, ")
    assert sorted(r[:2] for r in pruned) == [["udocker_prune", "ok"]] * 2
    assert api(nonroot, udir, call % "") == [["udocker_containers", "notneeded", None, None]]
    assert udocker_container_dirs(udir) == []


# --- bad input and faults -------------------------------------------------------------------
def assert_one_line_error(res, code=125, *words):
    assert res.returncode == code, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datalad-udocker-run: error:"), res.stderr
    for word in words:
        assert word in lines[0]


def assert_nothing_cached(udir):
    assert udocker_container_dirs(udir) == []
    assert not list((udir / "datalad-udocker" / "containers").glob("*.json"))


def test_unknown_execmode(nonroot, udir, images):
    res = run_cli(nonroot, udir, images["busybox"], "true", mode="X9")
    assert_one_line_error(res, 125, "X9", "P1")
    assert_nothing_cached(udir)


@pytest.mark.parametrize("mode,package", [("P1", "proot"), ("F1", "patchelf")])
def test_missing_tool_names_package(nonroot, udir, images, mode, package):
    res = run_cli(nonroot, udir, images["glibc"], "true", mode=mode,
                  path="/nonexistent")
    assert_one_line_error(res, 125, f"'{package}'", "apt-get install")
    assert_nothing_cached(udir)
    assert not (udir / "bin").exists()          # and no tools tarball was installed


def copy_layout(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(dst)], check=True)
    return dst


def first_layer(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" /
                           index["manifests"][0]["digest"].split(":")[1]).read_text())
    return layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]


def test_corrupt_layer_refused(nonroot, udir, images):
    layout = copy_layout(images["layers1"], udir.parent / "img")
    layer = first_layer(layout)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    res = run_cli(nonroot, udir, layout, "true")
    assert_one_line_error(res, 125, "corrupt", first_layer(layout).name)
    assert_nothing_cached(udir)
    assert not list((udir / "repos").rglob("TAG"))


def test_missing_layer_that_cannot_be_fetched(nonroot, udir, images):
    layout = copy_layout(images["layers1"], udir.parent / "img")
    first_layer(layout).unlink()
    res = run_cli(nonroot, udir, layout, "true")
    assert_one_line_error(res, 125, "not present")
    assert_nothing_cached(udir)


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_command_not_found(nonroot, udir, images, mode):
    res = run_cli(nonroot, udir, images["busybox"], "/no/such/program", "x", mode=mode)
    assert_one_line_error(res, 127, "command not found", "/no/such/program")
    res = run_cli(nonroot, udir, images["busybox"], "arg", entrypoint="/no/entry", mode=mode)
    assert_one_line_error(res, 127, "command not found", "/no/entry")
    # udocker's own options after the image are the command's arguments
    res = run_cli(nonroot, udir, images["busybox"], "echo", "-v", "/a:/b", "--rm",
                  "--entrypoint=/x", mode=mode)
    assert (res.returncode, res.stdout) == (0, "-v /a:/b --rm --entrypoint=/x\n")
    # the container itself is fine and stays cached for the next run
    assert run_cli(nonroot, udir, images["busybox"], "true", mode=mode).returncode == 0
    assert len(udocker_container_dirs(udir)) == 1


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_stdin_reaches_the_command(nonroot, udir, images, mode):
    res = nonroot.run([PY, "-m", "datalad_udocker.run.cli", "--execmode", mode,
                       str(images["busybox"]), "cat"],
                      env={"DATALAD_UDOCKER_DIR": str(udir)}, input="piped\n", check=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, "piped\n", "")


# --- the warm path: udocker's recorded PRoot command line -----------------------------------
PROBE = ("env | grep -v '^_=' | sort; pwd; id; cat /etc/passwd /etc/group; umask; "
         "echo err >&2; exit 3")


def fast_record(udir: Path):
    records = list((udir / "datalad-udocker" / "fast").glob("*.json"))
    assert len(records) <= 1
    return records[0] if records else None


@pytest.mark.parametrize("mode", ["P1", "P2"])
def test_warm_run_same_as_through_udocker(nonroot, udir, images, workdir, mode):
    """A warm P1/P2 run skips udocker's Python (its recorded PRoot line is
    reused: the record is not rewritten) and behaves exactly as a run
    through udocker: environment, cwd, ids, passwd/group, umask, stderr,
    status; anything it depends on changing, or a command
    it cannot vouch for, goes through udocker again."""
    def run(*cmd, cwd=workdir / "sub", image="busybox"):
        res = run_cli(nonroot, udir, images[image], *cmd, mode=mode, dataset=workdir,
                      cwd=cwd)
        return res.returncode, res.stdout, res.stderr

    first = run("true")                      # creates and records
    assert first == (0, "", "")
    record = fast_record(udir)
    assert record is not None
    ino = record.stat().st_ino
    warm = run("sh", "-c", PROBE)
    assert fast_record(udir).stat().st_ino == ino, "the warm run went through udocker"
    record.unlink()                          # the same run through udocker
    assert run("sh", "-c", PROBE) == warm
    assert warm[0] == 3 and "/sub\n" in warm[1] and warm[2] == "err\n"
    ino = fast_record(udir).stat().st_ino
    # another working directory, the dataset root
    assert run("pwd", cwd=workdir) == (0, f"{workdir}\n", "")
    assert fast_record(udir).stat().st_ino == ino
    # a command missing in the container: udocker's one-line error
    code, _, err = run("/no/such/program")
    assert code == 127 and "command not found" in err and len(err.splitlines()) == 1
    # the container's /etc/passwd changed: recorded again, through udocker
    cid = udocker_container_dirs(udir)[0]
    passwd = udir / "containers" / cid / "ROOT" / "etc" / "passwd"
    os.utime(passwd, (1, 1))
    assert run("true") == (0, "", "")
    assert fast_record(udir).stat().st_ino != ino



# --- concurrent runs on one container: PRoot's mount points --------------------------------
@pytest.mark.parametrize("mode", ["P1", "P2"])
def test_concurrent_runs_keep_their_dataset_bound(nonroot, udir, images, mode):
    """PRoot makes a missing mount point (the dataset's path and its parents,
    /etc/resolv.conf...) in the container's ROOT and removes it when it ends: with one
    container shared by concurrent runs, one run's removal raced another's start, which
    then ran without its dataset (in /, after a mere PRoot warning, writing its files
    into the container).  The runtime makes the mount points itself, and they stay:
    concurrent runs, each in its own dataset under one parent, all see theirs."""
    parent = nonroot.make_tempdir("udtest-many-")
    datasets = [parent / f"task-{i}" for i in range(8)]
    for ds in datasets:
        ds.mkdir()
        nonroot.chown(ds)
    env = nonroot.env({"DATALAD_UDOCKER_DIR": str(udir)})
    try:
        assert run_cli(nonroot, udir, images["busybox"], "true", mode=mode,
                       dataset=datasets[0], cwd=datasets[0]).returncode == 0   # created
        for round_ in range(4):
            procs = [start(nonroot.command([
                PY, "-m", "datalad_udocker.run.cli", "--execmode", mode, "--dataset",
                str(ds), str(images["busybox"]), "sh", "-c", f"pwd > r{round_}.txt"]),
                env=env, cwd=str(ds), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) for ds in datasets]
            try:
                results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
            finally:
                kill_group(*procs)
            assert results == [("", "", 0)] * len(datasets), (round_, results)
            for ds in datasets:
                assert (ds / f"r{round_}.txt").read_text() == f"{ds}\n"
        assert not list(udir.glob("containers/*/ROOT/r*.txt"))
        # the mount points are there for good: a run makes or removes nothing in ROOT
        root = udir / "containers" / udocker_container_dirs(udir)[0] / "ROOT"
        assert all((root / str(ds)[1:]).is_dir() for ds in datasets)
        assert (root / "etc" / "resolv.conf").is_file() == os.path.exists("/etc/resolv.conf")
        dirs = [root / "etc", root / "tmp", root / str(parent)[1:]]
        before = [d.stat().st_mtime_ns for d in dirs]
        assert run_cli(nonroot, udir, images["busybox"], "true", mode=mode,
                       dataset=datasets[1], cwd=datasets[1]).returncode == 0
        assert [d.stat().st_mtime_ns for d in dirs] == before
    finally:
        shutil.rmtree(parent, ignore_errors=True)



def test_mount_points_never_follow_a_symlink(tmp_path):
    """An image's symlink (absolute: the host's path under PRoot's view) on the way to a
    mount point is not followed: nothing is made outside the container's ROOT."""
    from datalad_udocker.run.runtime import make_mount_points
    ds = tmp_path / "ds"
    ds.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "ROOT"
    root.mkdir()
    (root / str(tmp_path.parent)[1:]).mkdir(parents=True)
    (root / str(tmp_path)[1:]).symlink_to(outside)       # the way to the dataset
    (root / "etc").symlink_to(outside)                   # /etc/resolv.conf's
    (root / "dev").write_text("")                        # not a directory
    make_mount_points(root, [str(ds), "/../up"])
    assert not list(outside.iterdir())
    assert (root / "dev").is_file() and not (tmp_path / "up").exists()
    (root / str(tmp_path)[1:]).unlink()
    make_mount_points(root, [str(ds)])
    assert (root / str(ds)[1:]).is_dir()


def test_launcher_fails_a_run_proot_could_not_enter_the_workdir_of(nonroot):
    """PRoot only warns when the working directory is not in the guest (a bind missing)
    and runs the command in / instead; the launcher stops the command and fails the run
    with a one-line error, so that no run "succeeds" without its dataset."""
    from datalad_udocker.run.tools import PROOT_LAUNCHER
    busybox = shutil.which("busybox")
    assert busybox, "busybox (static) is needed: apt-get install busybox-static"
    root = nonroot.make_tempdir("udtest-root-")
    try:
        shutil.copy(busybox, root / "busybox")
        nonroot.chown(root / "busybox")
        res = nonroot.run([*PROOT_LAUNCHER, shutil.which("proot"), "-r", str(root),
                           "-w", "/no/such/dir", "/busybox", "sh", "-c",
                           "/busybox sleep 600 & /busybox pwd; /busybox sleep 600"],
                          check=False, timeout=120)
        assert res.returncode == 125, (res.stdout, res.stderr)
        assert res.stderr.startswith("datalad-udocker: error: the working directory is "
                                     "not in the container"), res.stderr
        assert len(res.stderr.splitlines()) == 1 and res.stdout in ("", "/\n"), res.stderr
        # a working directory that is there runs as always
        res = nonroot.run([*PROOT_LAUNCHER, shutil.which("proot"), "-r", str(root),
                           "-w", "/", "/busybox", "sh", "-c", "/busybox pwd"], check=False,
                          timeout=120)
        assert (res.returncode, res.stdout, res.stderr) == (0, "/\n", "")
    finally:
        shutil.rmtree(root, ignore_errors=True)
