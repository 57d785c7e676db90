"""Hostile programs against kat_nb.sandbox: they come back as error results within their limits and leave the host alone.

The hostile set (`HOSTILE`) runs under bubblewrap and under the fallback, through the Python API and the `kat-nb
sandbox` command line. Under the fallback (`KAT_NB_SANDBOX=rlimits`) two of them are not stopped, by design and as
the fallback says when it announces itself: writes outside the workspace and reads of the user's files (it has no
file-system isolation). Those cases are strict xfails: if the fallback ever starts stopping them, the test says so.
A bubblewrap test that cannot run is skipped on a developer's machine and FAILS in CI (`CI` set): `.ci/run` installs
bubblewrap, so a skip there is a broken install step.
"""
import dataclasses, json, logging, os, resource, socket, stat, subprocess, sys, threading, time, uuid
from pathlib import Path

import pytest

from kat_nb import sandbox
from kat_nb.sandbox import (ExecResult, SandboxUnavailable, backend, bench_sandbox, bwrap_status, cgroup_status, execute,
                            isolation, sandbox_main)

HAVE_BWRAP = bwrap_status()[0]
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
KAT_NB = str(Path(sys.executable).parent/"kat-nb")


def require_bwrap():
    "Skip without a usable bubblewrap; in CI, fail instead (CI installs it)."
    if HAVE_BWRAP: return
    why = f"bubblewrap cannot run here ({bwrap_status()[1]})"
    if os.environ.get("CI"): pytest.fail(f"{why}: .ci/run installs it, so CI must not skip sandbox tests")
    pytest.skip(why)


@pytest.fixture(params=["bwrap", "rlimits"])
def iso(request):
    "Each isolation backend in turn."
    if request.param == "bwrap": require_bwrap()
    return request.param


@pytest.fixture
def bwrap():
    require_bwrap(); return "bwrap"


def _procs_with(marker: str) -> list[int]:
    "Live (non-zombie) processes whose command line contains `marker`."
    hits = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid(): continue
        try:
            if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes() and "Z" not in Path(f"/proc/{d}/stat").read_text().split(")")[-1].split()[:1]:
                hits.append(int(d))
        except OSError: pass
    return hits


def _gone(marker: str, within: float = 5.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not _procs_with(marker): return True
        time.sleep(0.05)
    return not _procs_with(marker)


def _nprocs() -> int: return sum(d.isdigit() for d in os.listdir("/proc"))


def _mark() -> str: return f"katnb-{uuid.uuid4().hex[:12]}"


# --- backend selection: no silent fallback --------------------------------------------------------------

def test_without_bubblewrap_nothing_runs_unless_the_fallback_is_asked_for(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(sandbox, "_ANNOUNCED", set())
    monkeypatch.delenv("KAT_NB_SANDBOX", raising=False)
    monkeypatch.setenv("KAT_NB_BWRAP", str(tmp_path/"no-such-bwrap"))
    for call in (backend, isolation, lambda: execute(["true"])):
        with pytest.raises(SandboxUnavailable) as e: call()
        msg = str(e.value)
        assert "not installed" in msg and "sudo apt-get install bubblewrap" in msg and "sudo dnf install bubblewrap" in msg, msg
        assert "KAT_NB_SANDBOX=rlimits" in msg and "does NOT contain" in msg and "every file" in msg, msg
    # a bwrap that cannot start a sandbox (user namespaces disabled) is found by the probe; the fix is the sysctl
    fake = tmp_path/"bwrap"; fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"); fake.chmod(0o755)
    monkeypatch.setenv("KAT_NB_BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions.*unprivileged_userns_clone"): backend()
    # the explicit opt-in runs, announced once per process with what it does not contain
    monkeypatch.setenv("KAT_NB_SANDBOX", "rlimits")
    with caplog.at_level(logging.WARNING, logger="kat_nb.sandbox"):
        assert backend() == "rlimits" and execute(["echo", "hi"]).backend == "rlimits" and execute(["true"]).ok
        assert isolation()["backend"] == "rlimits" and isolation()["filesystem"] is False
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "WITHOUT bubblewrap" in warns[0] and "does NOT contain" in warns[0], warns
    monkeypatch.setenv("KAT_NB_SANDBOX", "docker")
    with pytest.raises(ValueError, match="KAT_NB_SANDBOX"): backend()


def test_check_command_stops_without_bubblewrap_and_says_how_to_fix_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KAT_NB_SANDBOX"} | {"KAT_NB_BWRAP": str(tmp_path/"none")}
    p = subprocess.run([KAT_NB, "sandbox", "--check"], capture_output=True, text=True, env=env)
    assert p.returncode == 3 and "sudo apt-get install bubblewrap" in p.stderr and p.stdout == "", p
    p = subprocess.run([KAT_NB, "sandbox", "--", "echo", "hi"], capture_output=True, text=True, env=env)
    assert p.returncode == 3 and "hi" not in p.stdout, p
    p = subprocess.run([KAT_NB, "sandbox", "--check"], capture_output=True, text=True, env=env | {"KAT_NB_SANDBOX": "rlimits"})
    assert p.returncode == 0 and json.loads(p.stdout)["backend"] == "rlimits" and "WITHOUT bubblewrap" in p.stderr, p


def test_isolation_record_names_the_backend(iso, monkeypatch):
    monkeypatch.setenv("KAT_NB_SANDBOX", iso if iso == "rlimits" else "auto")
    rec = isolation()
    assert rec["backend"] == iso and rec["filesystem"] == (iso == "bwrap")
    if iso == "bwrap": assert rec["network"] and rec["pid_namespace"] and rec["mode"] in ("setuid", "userns")
    assert rec["memory_total"] == cgroup_status()["memory"]


# --- the hostile set: every program under both backends, through the API and the command line ------------------

def run_via(via: str, iso: str, cmd: list[str], **kw) -> ExecResult:
    "One execution through `execute` or the `kat-nb sandbox` command (its JSON read back)."
    if via == "api": return execute(cmd, isolation=iso, **kw)
    flags = {"timeout": "--timeout", "memory_mb": "--memory", "workspace": "--workspace", "max_output": "--max-output"}
    args = [x for k, v in kw.items() for x in (flags[k], str(v))]
    p = subprocess.run([KAT_NB, "sandbox", "--backend", iso, *args, "--", *cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p
    return ExecResult(**json.loads(p.stdout))


class Host:
    "What a hostile program may aim at on the host: a listening port, a file in the home folder, a path outside."
    def __init__(self, tmp_path: Path):
        self.m = _mark()
        self.srv = socket.socket(); self.srv.bind(("127.0.0.1", 0)); self.srv.listen(); self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.secret = Path.home()/f".katnb_secret_{self.m}"; self.secret.write_text(f"TOPSECRET-{self.m}")
        self.outside = [Path(f"/tmp/host_marker_{self.m}"), ROOT/f"x_{self.m}", Path.home()/f"pwned_{self.m}"]
        self.ws = tmp_path/"ws"; self.ws.mkdir()

    def nobody_connected(self) -> bool:
        try: self.srv.accept()[0].close(); return False
        except socket.timeout: return True

    def close(self):
        self.srv.close(); self.secret.unlink(missing_ok=True)
        for p in self.outside: p.unlink(missing_ok=True)


def _fork_bomb(h):
    return dict(cmd=[PY, "-S", "-c", f"import os  # {h.m}\nwhile True:\n    try: os.fork()\n    except OSError: pass"], timeout=2.0), \
        lambda r: not r.ok and (r.timed_out or r.killed_reason == "process_limit") and r.wall_s < 5 and _gone(h.m)

def _memory_bomb(h):
    return dict(cmd=[PY, "-S", "-c", "l = []\nwhile True: l.append(bytearray(2**20))"], memory_mb=256, timeout=10), \
        lambda r: not r.ok and "MemoryError" in r.stderr and r.wall_s < 5

def _infinite_loop(h):
    return dict(cmd=[PY, "-S", "-c", "while True: pass"], timeout=1.0), \
        lambda r: not r.ok and (r.timed_out or r.killed_reason == "cpu_limit") and r.wall_s < 3

def _sigterm_ignoring_child(h):
    code = (f"import os, signal, time  # {h.m}\nif os.fork() == 0:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    while True: pass\nprint('bye')\n")
    return dict(cmd=[PY, "-S", "-c", code], timeout=5.0), lambda r: r.stdout == "bye\n" and r.wall_s < 3 and _gone(h.m, 2)

def _setsid_child(h):
    code = f"import os, time  # {h.m}\nif os.fork() == 0:\n    os.setsid(); time.sleep(100)\nprint('parent done')"
    return dict(cmd=[PY, "-S", "-c", code], timeout=5.0), lambda r: r.ok and r.stdout == "parent done\n" and _gone(h.m, 2)

def _host_port(h):
    code = (f"import socket\ntry: socket.create_connection(('127.0.0.1', {h.port}), timeout=2); print('CONNECTED')\n"
            "except OSError as e: print('refused', e.errno)")
    return dict(cmd=[PY, "-S", "-c", code]), lambda r: r.stdout.startswith("refused") and r.wall_s < 3 and h.nobody_connected()

def _write_outside(h):
    return dict(cmd=["sh", "-c", "; ".join(f"echo pwned > {p}" for p in h.outside) + "; echo done"], workspace=h.ws), \
        lambda r: r.stdout.strip().endswith("done") and not any(p.exists() for p in h.outside)

def _read_home(h):
    return dict(cmd=["sh", "-c", f"cat {h.secret}; cat ~root/{h.secret.name}; ls -a {Path.home()}"]), \
        lambda r: f"TOPSECRET-{h.m}" not in r.stdout and h.secret.name not in r.stdout

def _huge_output(h):
    return dict(cmd=[PY, "-S", "-c", "import sys\nb = 'x' * 2**20\nwhile True: sys.stdout.write(b)"], max_output=65536, timeout=20), \
        lambda r: r.killed_reason == "output_limit" and r.wall_s < 3 and len(r.stdout) < 65536 + 200

def _disk_fill(h):
    return dict(cmd=["sh", "-c", "i=0; while :; do i=$((i+1)); head -c 8000000 /dev/zero > f$i || exit 9; done"], timeout=30), \
        lambda r: r.killed_reason in ("disk_limit", "memory_limit") and r.wall_s < 20

HOSTILE = {"fork_bomb": _fork_bomb, "memory_bomb": _memory_bomb, "infinite_loop": _infinite_loop,
           "sigterm_ignoring_child": _sigterm_ignoring_child, "setsid_child": _setsid_child, "host_port": _host_port,
           "write_outside": _write_outside, "read_home": _read_home, "huge_output": _huge_output, "disk_fill": _disk_fill}
# What the fallback does not stop (it says so in its announcement): it has no file-system isolation.
FALLBACK_DOES_NOT_STOP = {"write_outside", "read_home"}


@pytest.mark.parametrize("via", ["api", "cli"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name, via, iso, tmp_path, request):
    if iso == "rlimits" and name in FALLBACK_DOES_NOT_STOP:
        request.applymarker(pytest.mark.xfail(strict=True, reason="the fallback has no file-system isolation (documented)"))
    if iso == "rlimits" and name in ("host_port", "setsid_child") and not sandbox.fallback_status()["namespaces"] \
            and not (name == "setsid_child" and cgroup_status()["pids"]):
        request.applymarker(pytest.mark.xfail(strict=True, reason="no namespaces for the fallback here: " + str(sandbox.fallback_status())))
    h = Host(tmp_path)
    try:
        kw, contained = HOSTILE[name](h)
        r = run_via(via, iso, kw.pop("cmd"), **kw)
        assert r.backend == iso
        assert contained(r), r
        assert subprocess.run(["true"]).returncode == 0                   # the host can still start processes
    finally: h.close()


@pytest.mark.parametrize("bomb", ["shell", "shell-held", "python"])
def test_fork_bomb_hits_the_limit_and_nothing_survives(iso, bomb):
    "Each bomb meets the process limit (bash reports failed forks, or the run is stopped); after the call none of it is left."
    m = _mark(); n0 = _nprocs()
    cmd = {"shell": ["bash", "-c", f":(){{ :|:& }};:; sleep 2 # {m}"],
           "shell-held": ["bash", "-c", f":(){{ :|:& }};:; sleep 30 # {m}"],
           "python": [PY, "-S", "-c", f"import os  # {m}\nwhile True:\n    try: os.fork()\n    except OSError: pass"]}[bomb]
    r = execute(cmd, timeout=5.0 if bomb == "shell" else 2.0, isolation=iso)
    # The limit is met when bash reports failed forks or the run is stopped for it. Whether the plain shell bomb gets
    # through its retries before the timeout depends on the machine's load (bash backs off between fork retries; CI saw
    # 5.01 s with two test workers and a training run on two cores), so its time is not asserted.
    if bomb == "shell": assert "fork" in r.stderr or r.killed_reason == "process_limit", r
    else: assert not r.ok and (r.timed_out or r.killed_reason == "process_limit"), r
    if bomb == "shell-held": assert "fork" in r.stderr or r.killed_reason == "process_limit", r
    assert _gone(m), f"fork bomb processes left behind: {_procs_with(m)[:10]}"
    for _ in range(100):                                           # the dying bomb is reaped: the count comes back
        if _nprocs() < n0 + 30: break
        time.sleep(0.05)
    assert _nprocs() < n0 + 30, (n0, _nprocs())


def test_one_big_allocation_fails_with_memory_error(iso):
    r = execute([PY, "-S", "-c", "x = bytearray(8 * 2**30)"], memory_mb=256, isolation=iso)
    assert not r.ok and "MemoryError" in r.stderr, r


def test_total_memory_of_a_run_is_bounded_by_its_cgroup(iso):
    "Eight processes of 200 MB each stay under the per-process limit (256 MB) but not under the run's total (2 x 256 MB)."
    if not cgroup_status()["memory"]: pytest.skip(f"no writable memory cgroup here: {cgroup_status()['why_not']}")
    code = ("import os, time\nkids = []\nfor i in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = bytearray(200 * 2**20)\n        for j in range(0, len(b), 4096): b[j] = 1\n        time.sleep(5); os._exit(0)\n"
            "    kids.append(pid)\nbad = sum(os.waitpid(p, 0)[1] != 0 for p in kids)\nprint('killed', bad); raise SystemExit(1 if bad else 0)")
    r = execute([PY, "-S", "-c", code], memory_mb=256, timeout=20, isolation=iso)
    assert not r.ok and r.killed_reason == "memory_limit" or "killed" in r.stdout and r.stdout.split()[-1] != "0", r
    # and the same program with a total that fits runs to the end
    r = execute([PY, "-S", "-c", code.replace("range(8)", "range(2)")], memory_mb=256, timeout=20, isolation=iso)
    assert r.ok and r.stdout == "killed 0\n", r


def test_no_cgroup_means_the_process_limits_still_hold(iso, monkeypatch):
    "Where no cgroup is writable, the rlimits (and, for root under the fallback, the thread watchdog) still stop the bombs."
    monkeypatch.setattr(sandbox, "_cgroup_layout", lambda: ({}, "none for this test"))
    assert sandbox.RunCgroup.make(512, 64) is None
    r = execute([PY, "-S", "-c", "x = bytearray(2**30)"], memory_mb=256, isolation=iso)
    assert not r.ok and "MemoryError" in r.stderr, r
    r = execute([PY, "-S", "-c", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"], timeout=2.0, isolation=iso)
    assert not r.ok and (r.timed_out or r.killed_reason == "process_limit") and r.wall_s < 4, r


def test_a_killed_command_is_reported_like_a_direct_child(iso):
    "Under bubblewrap and the fallback's `sh` a signal death is 128+N: reported as -N with its reason."
    r = execute(["sh", "-c", "kill -XCPU $$"], isolation=iso)
    assert (r.exit_code, r.killed_reason) == (-24, "cpu_limit"), r
    r = execute([PY, "-S", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], isolation=iso)
    assert (r.exit_code, r.killed_reason) == (-9, "signal SIGKILL"), r
    r = execute(["sh", "-c", "exit 3"], isolation=iso)
    assert (r.exit_code, r.killed_reason) == (3, None), r
    r = execute(["no-such-program-xyz"], isolation=iso)
    assert r.exit_code == 127, r


def test_stdin_reaches_the_command(iso):
    r = execute([PY, "-S", "-c", "import sys; print(sys.stdin.read()[::-1])"], stdin="olleh", isolation=iso)
    assert r.ok and r.stdout == "hello\n", r
    r = execute(["true"], stdin=b"x" * 2**20, isolation=iso)          # a command that does not read cannot block us
    assert r.ok and r.wall_s < 3, r


def test_printing_gigabytes_keeps_the_callers_memory_bounded(iso):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = execute(["head", "-c", str(3 * 2**30), "/dev/zero"], max_output=1000, timeout=20, isolation=iso)
    assert r.killed_reason == "output_limit" and r.wall_s < 3, r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000        # KiB: no gigabytes kept


def test_huge_file_is_stopped_by_the_file_size_limit(iso, tmp_path):
    r = execute(["sh", "-c", "head -c 100000000 /dev/zero > big; echo $?"], workspace=tmp_path, isolation=iso)
    assert (tmp_path/"big").stat().st_size <= sandbox.FILE_SIZE_MB * 2**20
    assert r.stdout.strip() == "153", r                          # 128 + SIGXFSZ, as the shell reports it


def test_filling_the_disk_file_by_file_is_stopped(iso, monkeypatch):
    monkeypatch.setattr(sandbox, "DISK_MB", 48)
    r = execute(["sh", "-c", "i=0; while :; do i=$((i+1)); head -c 8000000 /dev/zero > f$i; done"], timeout=20, isolation=iso)
    assert r.killed_reason == "disk_limit" and r.wall_s < 5, r


def test_another_process_filling_the_same_file_system_does_not_stop_a_run(iso, monkeypatch):
    "The disk watchdog counts the run's own workspace, not the whole file system (parallel runs share /dev/shm)."
    monkeypatch.setattr(sandbox, "DISK_MB", 48)
    other = sandbox.new_workspace("katnb-other-")
    def fill(): time.sleep(0.3); (other/"big").write_bytes(b"0" * (100 * 2**20))
    th = threading.Thread(target=fill); th.start()
    try: r = execute(["sleep", "1.5"], timeout=10, isolation=iso)
    finally: th.join(); import shutil; shutil.rmtree(other)
    assert r.ok and r.killed_reason is None, r


# --- isolation only bubblewrap provides ----------------------------------------------------------------

def test_bubblewrap_details_outside_the_workspace(bwrap, tmp_path):
    "Deletes and system paths, a private /tmp, planted links handed back untouched, set-uid bits that do not become real."
    m = _mark()
    victim = Path(f"/tmp/victim_{m}"); victim.write_text("keep me")
    try:
        cmd = (f"rm -f {victim}; echo pwned > {victim}; echo pwned > /usr/bin/pwned_{m}; echo x > /etc/passwd; "
               f"mkdir /root/{m}; echo pwned > /tmp/host_marker_{m}; cat {victim}; echo done")
        r = execute(["sh", "-c", cmd], workspace=tmp_path, isolation="bwrap")
        assert r.stdout.strip().endswith("done") and "keep me" not in r.stdout, r
        assert not Path(f"/usr/bin/pwned_{m}").exists() and victim.read_text() == "keep me" and not Path(f"/root/{m}").exists()
        # the sandbox's /tmp is private to the run: gone in the next one
        r = execute(["sh", "-c", f"ls /tmp/host_marker_{m}"], workspace=tmp_path, isolation="bwrap")
        assert r.exit_code != 0 and not Path(f"/tmp/host_marker_{m}").exists(), r
        # a symbolic link planted in the workspace is handed back without touching its target
        r = execute(["sh", "-c", f"ln -s {victim} link; ln -s /usr/bin ubin; echo ok"], workspace=tmp_path, isolation="bwrap")
        assert r.ok, r
        assert victim.stat().st_uid == os.getuid() and Path("/usr/bin").stat().st_uid == 0
        assert {p.lstat().st_uid for p in tmp_path.iterdir()} == {os.getuid()}
        # a hard link to a host file cannot be made from inside (the workspace is its own mount)
        r = execute(["sh", "-c", f"ln {sys.executable} py 2>&1; ln /usr/bin/id id2 2>&1; ls"], workspace=tmp_path, isolation="bwrap")
        assert "py\n" not in r.stdout and "id2" not in r.stdout.split(), r
        # a set-uid program made in the workspace runs as the sandbox's unprivileged user, and is not set-uid on the host
        r = execute(["sh", "-c", "cp /usr/bin/id myid && chmod 6755 myid && ./myid -u"], workspace=tmp_path, isolation="bwrap")
        assert r.ok and int(r.stdout) != 0, r
        if os.geteuid() == 0: assert int(r.stdout) == sandbox.sandbox_uid(), r
        assert not (tmp_path/"myid").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    finally:
        victim.unlink(missing_ok=True)


def test_host_files_are_not_readable(bwrap, tmp_path):
    m = _mark()
    secrets = [Path(f"/tmp/secret_{m}"), Path.home()/f"secret_{m}"]
    for s in secrets: s.write_text(f"TOPSECRET-{m}")
    try:
        targets = [*map(str, secrets), str(ROOT/"params.yaml"), "/etc/shadow", "/etc/passwd", str(ROOT/".git/config"),
                   str(Path(sys.executable).parent.parent/"pyvenv.cfg")]
        r = execute(["sh", "-c", "; ".join(f"cat {t}" for t in targets) + "; ls /work /home; ls -a $HOME"],
                    workspace=tmp_path, isolation="bwrap")
        assert f"TOPSECRET-{m}" not in r.stdout and "profile" not in r.stdout and "root:" not in r.stdout, r
        assert r.stderr.count("No such file") >= len(targets), r
        # the venv's third-party packages are not there either: only the interpreter and its standard library
        r = execute([PY, "-c", "import sys, json\ntry:\n    import numpy\nexcept ImportError: print('no numpy')\nprint(sys.prefix)"],
                    isolation="bwrap")
        assert r.stdout.splitlines() == ["no numpy", str(Path(sys.base_prefix).resolve())], r
    finally:
        for s in secrets: s.unlink(missing_ok=True)


def test_sandbox_sees_only_its_mounts(bwrap):
    r = execute(["sh", "-c", "cat /proc/self/mountinfo; echo ---; ls /proc | grep -c '^[0-9]'; id -u"], isolation="bwrap")
    mounts, rest = r.stdout.split("---\n")
    nproc, uid = rest.split()
    points = {l.split()[4] for l in mounts.splitlines()}
    allowed = {"/", "/usr", "/proc", "/dev", "/tmp", "/workspace", "/etc/ld.so.cache", "/etc/alternatives"} | \
              {str(p) for p in sandbox.python_mounts() + sandbox.hidden_site_packages()} | \
              {str(p) for p in sandbox._EXTRA_READ_ONLY}     # toolchains outside /usr (kat_nb.toolchains: rustup's, a JDK's conf)
    assert all(len(p.parts) > 2 for p in sandbox._EXTRA_READ_ONLY), sandbox._EXTRA_READ_ONLY   # never a whole /root or /etc
    extra = {p for p in points if p not in allowed and not p.startswith(("/dev/", "/proc/"))}
    assert not extra, extra
    assert not any(p in ("/work", "/home", "/dev/shm") or p.startswith(("/work/", "/home/", "/dev/shm/")) for p in points)
    assert int(nproc) <= 5                                         # its own PID namespace: a handful of processes
    if os.geteuid() == 0: assert int(uid) == sandbox.sandbox_uid()   # not root on the host


def test_episode_cannot_read_hidden_tests_or_solutions(iso, monkeypatch):
    "Under both backends the agent's workspace never holds them; under bubblewrap nothing else the agent sees does."
    from kat_nb.world import Workspace, make_world, run_hidden_tests
    monkeypatch.setenv("KAT_NB_SANDBOX", iso)
    task = make_world(0, n_train=1, n_valid=1, n_test=1)["test"][0]
    canary = _mark()
    task = dataclasses.replace(task, tests={k: v + f"\n# {canary}\n" for k, v in task.tests.items()},
                               solutions=[{k: v + f"\n# {canary}\n" for k, v in s.items()} for s in task.solutions])
    assert all(canary not in v for v in task.files.values())
    stop, scored = threading.Event(), []
    def score():                                                   # scoring workspaces come and go meanwhile
        while not stop.is_set(): scored.append(run_hidden_tests(task, task.solutions[0]).ok)
    th = threading.Thread(target=score); th.start()
    try:
        with Workspace.from_task(task) as ws:
            assert not any(canary in t for t in ws.files().values())
            cmd = f"grep -rl {canary} . 2>/dev/null; ls -a"
            if iso == "bwrap":      # everywhere the sandbox can see but the system and the read-only standard library
                cmd = (f"grep -rlI -D skip {canary} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr "
                       "--exclude-dir='python3.*' 2>/dev/null; ls -a /tmp /dev/shm; ls /")
            for _ in range(3):
                r = ws.call("run", {"command": cmd})
                assert canary not in r["observation"] and "katnb-score" not in r["observation"], r
            # a link to a file outside the repository is refused by the tools
            ws.call("run", {"command": "ln -s /etc/hostname leak"})
            assert ws.call("view_file", {"path": "leak"})["status"] == "error"
    finally:
        stop.set(); th.join()
    assert scored and all(scored)


def test_user_namespace_mode(bwrap, monkeypatch):
    "The mode a user who is not root gets (no setpriv: a user namespace); as root here it runs the same code path."
    monkeypatch.setattr(sandbox, "sandbox_uid", lambda: None)
    r = execute(["sh", "-c", "echo $HOME; cat /etc/hostname; ls /work"], isolation="bwrap")
    assert r.stdout == "/workspace\n" and r.stderr.count("No such file") == 2, r
    r = execute([PY, "-S", "-c", "import socket\ntry: socket.create_connection(('1.1.1.1', 53), timeout=2)\nexcept OSError: print('no net')"],
                isolation="bwrap")
    assert r.stdout == "no net\n", r


# --- the command line -------------------------------------------------------------------------------------

KEYS = {"exit_code", "stdout", "stderr", "timed_out", "killed_reason", "wall_s", "backend"}


def test_sandbox_main_in_process(capsys, tmp_path):
    assert sandbox_main(["--timeout", "5", "--workspace", str(tmp_path), "--", "sh", "-c", "echo hi > f.txt; echo --x"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == KEYS and out["stdout"] == "--x\n" and out["backend"] == backend()
    assert (tmp_path/"f.txt").read_text() == "hi\n"
    assert sandbox_main(["--timeout", "0.5", "sleep", "5"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["timed_out"] and out["killed_reason"] == "timeout"
    assert sandbox_main(["--backend", "rlimits", "--memory", "128", "--", PY, "-S", "-c", "bytearray(2**30)"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "rlimits" and "MemoryError" in out["stderr"]
    with pytest.raises(SystemExit) as e: sandbox_main(["--timeout", "1"])
    assert e.value.code == 2


def test_sandbox_cli_subprocess():
    cli = [PY, "-c", "import sys; from kat_nb.sandbox import sandbox_main; sys.exit(sandbox_main(sys.argv[1:]))"]
    p = subprocess.run(cli + ["--timeout", "5", "--", "sh", "-c", "echo $HOME; exit 3"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == KEYS and out["exit_code"] == 3 and out["backend"] == ("bwrap" if HAVE_BWRAP else "rlimits")
    if HAVE_BWRAP: assert out["stdout"] == "/workspace\n"
    p = subprocess.run(cli + ["--", "true"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and json.loads(p.stdout)["exit_code"] == 0


# --- benchmark (no timing assertions) ---------------------------------------------------------------------

def test_bench_sandbox_rows():
    rows = bench_sandbox(quick=True, calls=2)
    configs = {"bare", "rlimits"} | ({"bwrap"} if HAVE_BWRAP else set())
    assert {(r["config"], r["cmd"]) for r in rows} == {(c, m) for c in configs for m in ("true", "python -S -c pass")}
    for r in rows:
        assert r["per_call_ms"] > 0 and r["calls_per_s"] > 0 and r["calls"] == 2
        assert r["overhead_ms_vs_bare"] == 0 if r["config"] == "bare" else isinstance(r["overhead_ms_vs_bare"], float)
