"""Hostile programs against kat_nb.sandbox: they come back as error results within their limits and leave the host alone.

Most checks run under both backends. Those marked `bwrap_only` test isolation that only bubblewrap provides
(the rlimits fallback shares the host's file system and network: as root it can read /etc/shadow, write
anywhere and connect anywhere; that is why the fallback announces itself with a warning).
"""
import dataclasses, json, logging, os, resource, socket, stat, subprocess, sys, threading, time, uuid
from pathlib import Path

import pytest

from kat_nb import sandbox
from kat_nb.sandbox import backend, bench_sandbox, bwrap_status, execute, sandbox_main

HAVE_BWRAP = bwrap_status()[0]
BACKENDS = [pytest.param("bwrap", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap cannot run here")), "rlimits"]
bwrap_only = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap cannot run here")
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def _procs_with(marker: str) -> list[int]:
    "Live (non-zombie) processes whose command line contains `marker`."
    hits = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid(): continue
        try:
            if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes(): hits.append(int(d))
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


# --- backend selection ------------------------------------------------------------------------------

def test_backend_env_forces_fallback(monkeypatch):
    monkeypatch.setenv("KAT_NB_SANDBOX", "rlimits")
    assert backend() == "rlimits" and execute(["true"]).backend == "rlimits"
    monkeypatch.setenv("KAT_NB_SANDBOX", "docker")
    with pytest.raises(ValueError, match="KAT_NB_SANDBOX"): backend()
    monkeypatch.delenv("KAT_NB_SANDBOX")
    assert backend() == ("bwrap" if HAVE_BWRAP else "rlimits")
    assert execute(["true"]).backend == backend()


def test_missing_or_broken_bwrap_warns_once_and_falls_back(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(sandbox, "_WARNED", set())
    monkeypatch.delenv("KAT_NB_SANDBOX", raising=False)
    monkeypatch.setenv("KAT_NB_BWRAP", str(tmp_path/"no-such-bwrap"))
    with caplog.at_level(logging.WARNING, logger="kat_nb.sandbox"):
        assert backend() == "rlimits" and backend() == "rlimits"
        assert execute(["echo", "hi"]).backend == "rlimits"
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "apt-get install bubblewrap" in warns[0].getMessage() and "not installed" in warns[0].getMessage()
    # a bwrap that cannot start a sandbox (e.g. user namespaces disabled) is detected by the probe
    fake = tmp_path/"bwrap"; fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"); fake.chmod(0o755)
    monkeypatch.setenv("KAT_NB_BWRAP", str(fake)); caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kat_nb.sandbox"):
        assert backend() == "rlimits" and backend() == "rlimits"
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "cannot start a sandbox" in warns[0] and "No permissions" in warns[0]
    monkeypatch.setenv("KAT_NB_SANDBOX", "bwrap")
    with pytest.raises(RuntimeError, match="apt-get install bubblewrap"): backend()


# --- hostile programs, both backends -------------------------------------------------------------------

@pytest.mark.parametrize("iso", BACKENDS)
@pytest.mark.parametrize("bomb", ["shell", "shell-held", "python"])
def test_fork_bomb_is_contained(iso, bomb):
    "The classic bomb returns at once (its leader exits: everything it forked dies); held open, it is an error result."
    m = _mark(); n0 = _nprocs()
    cmd = {"shell": ["bash", "-c", f":(){{ :|:& }};: # {m}"],
           "shell-held": ["bash", "-c", f":(){{ :|:& }};:; sleep 30 # {m}"],
           "python": [PY, "-S", "-c", f"import os  # {m}\nwhile True:\n    try: os.fork()\n    except OSError: pass"]}[bomb]
    r = execute(cmd, timeout=2.0, isolation=iso)
    assert r.wall_s < 4, r
    if bomb != "shell": assert not r.ok and (r.timed_out or r.killed_reason == "process_limit"), r
    assert _gone(m), f"fork bomb processes left behind: {_procs_with(m)[:10]}"
    assert subprocess.run(["true"]).returncode == 0                  # the host can still start processes
    for _ in range(100):                                           # the dying bomb is reaped: the count comes back
        if _nprocs() < n0 + 30: break
        time.sleep(0.05)
    assert _nprocs() < n0 + 30, (n0, _nprocs())


@pytest.mark.parametrize("iso", BACKENDS)
def test_memory_bombs_fail_with_memory_error(iso):
    r = execute([PY, "-S", "-c", "x = bytearray(8 * 2**30)"], memory_mb=256, isolation=iso)
    assert not r.ok and "MemoryError" in r.stderr, r
    r = execute([PY, "-S", "-c", "l = []\nwhile True: l.append(bytearray(2**20))"], memory_mb=256, timeout=10, isolation=iso)
    assert not r.ok and "MemoryError" in r.stderr and r.wall_s < 5, r


@pytest.mark.parametrize("iso", BACKENDS)
def test_infinite_loop_is_stopped(iso):
    r = execute([PY, "-S", "-c", "while True: pass"], timeout=1.0, isolation=iso)
    assert not r.ok and (r.timed_out or r.killed_reason == "cpu_limit") and r.wall_s < 3, r
    r = execute(["sh", "-c", "while :; do :; done"], timeout=1.0, isolation=iso)
    assert not r.ok and r.timed_out and r.wall_s < 3, r


@pytest.mark.parametrize("iso", BACKENDS)
def test_child_that_ignores_sigterm_is_killed(iso):
    m = _mark()
    code = (f"import os, signal, time  # {m}\n"
            "if os.fork() == 0:\n"
            "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    while True: pass\n"
            "time.sleep(100)\n")
    r = execute([PY, "-S", "-c", code], timeout=1.0, isolation=iso)
    assert r.timed_out and r.killed_reason == "timeout" and r.wall_s < 3, r
    assert _gone(m)
    # the parent exits at once and leaves the busy child behind: it dies with the parent
    r = execute([PY, "-S", "-c", code.replace("time.sleep(100)", "print('bye')")], timeout=5.0, isolation=iso)
    assert r.stdout == "bye\n" and r.wall_s < 3, r
    assert _gone(m)


@bwrap_only
def test_a_child_that_leaves_the_session_dies_too():
    "setsid() escapes a process-group kill; it does not escape the PID namespace."
    m = _mark()
    code = f"import os, time  # {m}\nif os.fork() == 0:\n    os.setsid(); time.sleep(100)\nprint('parent done')"
    r = execute([PY, "-S", "-c", code], timeout=5.0, isolation="bwrap")
    assert r.ok and r.stdout == "parent done\n", r
    assert _gone(m, within=2)


@pytest.mark.parametrize("iso", BACKENDS)
def test_printing_gigabytes_is_capped_quickly_with_bounded_memory(iso):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = execute([PY, "-S", "-c", "import sys\nb = 'x' * 2**20\nwhile True: sys.stdout.write(b)"], max_output=65536, timeout=20, isolation=iso)
    assert r.killed_reason == "output_limit" and r.wall_s < 3 and len(r.stdout) < 65536 + 200, r.to_dict() | {"stdout": len(r.stdout)}
    r = execute(["head", "-c", str(3 * 2**30), "/dev/zero"], max_output=1000, timeout=20, isolation=iso)
    assert r.killed_reason == "output_limit" and r.wall_s < 3, r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000        # KiB: no gigabytes kept


@pytest.mark.parametrize("iso", BACKENDS)
def test_huge_file_is_stopped_by_the_file_size_limit(iso, tmp_path):
    r = execute(["sh", "-c", "head -c 100000000 /dev/zero > big; echo $?"], workspace=tmp_path, isolation=iso)
    assert (tmp_path/"big").stat().st_size <= sandbox.FILE_SIZE_MB * 2**20
    assert r.stdout.strip() == "153", r                          # 128 + SIGXFSZ, as the shell reports it


@pytest.mark.parametrize("iso", BACKENDS)
def test_filling_the_disk_file_by_file_is_stopped(iso, monkeypatch):
    monkeypatch.setattr(sandbox, "DISK_MB", 48)
    r = execute(["sh", "-c", "i=0; while :; do i=$((i+1)); head -c 8000000 /dev/zero > f$i; done"], timeout=20, isolation=iso)
    assert r.killed_reason == "disk_limit" and r.wall_s < 5, r


# --- isolation only bubblewrap provides ----------------------------------------------------------------

@bwrap_only
def test_no_network():
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(); srv.settimeout(0.2)
    port = srv.getsockname()[1]
    code = ("import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('10.0.0.1', 80)]:\n"
            "    try: socket.create_connection(addr, timeout=2); print('CONNECTED', addr)\n"
            "    except OSError as e: print('refused', addr, e.errno)\n"
            "try: socket.getaddrinfo('example.com', 80); print('RESOLVED')\n"
            "except OSError: print('no dns')\n")
    r = execute([PY, "-S", "-c", code], isolation="bwrap")
    assert r.ok and "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout and r.stdout.count("refused") == 3, r
    assert r.wall_s < 3, r
    with pytest.raises(socket.timeout): srv.accept()                # the host's listener saw nobody
    srv.close()


@bwrap_only
def test_writes_and_deletes_outside_the_workspace_do_not_reach_the_host(tmp_path):
    m = _mark()
    marker, in_repo = Path(f"/tmp/host_marker_{m}"), ROOT/f"x_{m}"
    victim = Path(f"/tmp/victim_{m}"); victim.write_text("keep me")
    try:
        cmd = (f"echo pwned > {marker}; echo pwned > {in_repo}; rm -f {victim}; echo pwned > {victim}; "
               f"echo pwned > /usr/bin/pwned_{m}; echo x > /etc/passwd; mkdir /root/{m}; "
               f"ls {marker}; cat {victim}; echo done")
        r = execute(["sh", "-c", cmd], workspace=tmp_path, isolation="bwrap")
        assert r.stdout.strip().endswith("done") and "keep me" not in r.stdout, r
        assert not marker.exists() and not in_repo.exists() and not Path(f"/usr/bin/pwned_{m}").exists()
        assert victim.read_text() == "keep me" and not Path(f"/root/{m}").exists()
        # the sandbox's /tmp is private to the run: gone in the next one
        r = execute(["sh", "-c", f"ls /tmp/host_marker_{m}"], workspace=tmp_path, isolation="bwrap")
        assert r.exit_code != 0, r
        # a symbolic link planted in the workspace is handed back without touching its target
        r = execute(["sh", "-c", f"ln -s {victim} link; ln -s /usr/bin ubin; echo ok"], workspace=tmp_path, isolation="bwrap")
        assert r.ok, r
        assert victim.stat().st_uid == os.getuid() and Path("/usr/bin").stat().st_uid == 0
        assert {p.lstat().st_uid for p in tmp_path.iterdir()} == {os.getuid()}
        # a set-uid program made in the workspace does not become a set-uid program of the host's user
        r = execute(["sh", "-c", "cp /usr/bin/id myid && chmod 6755 myid && ./myid -u"], workspace=tmp_path, isolation="bwrap")
        assert r.ok and r.stdout.strip() != "0" or os.geteuid() != 0, r
        assert not (tmp_path/"myid").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    finally:
        victim.unlink(missing_ok=True); marker.unlink(missing_ok=True); in_repo.unlink(missing_ok=True)


@bwrap_only
def test_host_files_are_not_readable(tmp_path):
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


@bwrap_only
def test_sandbox_sees_only_its_mounts():
    r = execute(["sh", "-c", "cat /proc/self/mountinfo; echo ---; ls /proc | grep -c '^[0-9]'; id -u"], isolation="bwrap")
    mounts, rest = r.stdout.split("---\n")
    nproc, uid = rest.split()
    points = {l.split()[4] for l in mounts.splitlines()}
    allowed = {"/", "/usr", "/proc", "/dev", "/tmp", "/workspace", "/etc/ld.so.cache", "/etc/alternatives"} | \
              {str(p) for p in sandbox.python_mounts() + sandbox.hidden_site_packages()}
    extra = {p for p in points if p not in allowed and not p.startswith(("/dev/", "/proc/"))}
    assert not extra, extra
    assert not any(p in ("/work", "/home", "/dev/shm") or p.startswith(("/work/", "/home/", "/dev/shm/")) for p in points)
    assert int(nproc) <= 5                                         # its own PID namespace: a handful of processes
    if os.geteuid() == 0: assert int(uid) == sandbox.sandbox_uid()   # not root on the host


@pytest.mark.parametrize("iso", BACKENDS)
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


@bwrap_only
def test_user_namespace_mode(monkeypatch):
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
