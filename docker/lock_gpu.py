#!/usr/bin/env python3
"""Lock the GPU requirement set for the Docker image (docker/Dockerfile).

The set is requirements.txt + requirements-gpu.txt, where a line of requirements-gpu.txt replaces
requirements.txt's line for the same package (transformers: vllm 0.31 caps it below 5.18). pip resolves it
from PyPI for the image's platform: linux x86_64, CPython 3.12 (Ubuntu 24.04's python3, glibc 2.39).
Outputs: requirements-gpu.lock (name==version, every package the image installs) and
docker/gpu-resolution.json (version and Requires-Dist of each locked package, for the offline test
tests/test_gpu_image.py).

Run from anywhere, with PyPI reachable and a CPython 3.12 interpreter (found as `python3.12`, under pyenv,
or given with --python / $KAT_NB_PY312):

    python docker/lock_gpu.py                       # regenerate (same cutoff: same result)
    python docker/lock_gpu.py --uploaded-prior-to 2027-01-31T00:00:00Z   # move the lock forward
    python docker/lock_gpu.py --out /tmp/lock       # write elsewhere (the slow test compares)

Why the details:
- pip evaluates environment markers against the interpreter that runs it, even with --python-version
  (vllm's `setuptools<81; python_version > "3.11"` is skipped when 3.11 resolves), so the resolution runs in
  a fresh CPython 3.12 venv with a pinned pip.
- --platform/--only-binary=:all: make the result independent of this machine's glibc; the one sdist-only
  package (deepspeed: no wheels on PyPI) is built here first as its pure-Python wheel (no ops are
  prebuilt: DS_BUILD_OPS is unset, DeepSpeed JIT-compiles them at run time) and offered with --find-links.
- --uploaded-prior-to fixes the view of PyPI, so re-running gives the same lock.
- PIP_CONFIG_FILE=/dev/null and --isolated: no config file (a global constraint file, local extra indexes)
  and no PIP_* variable of the machine may change what PyPI resolves to.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements-gpu.lock"
RESOLUTION = "docker/gpu-resolution.json"
PIP_VERSION = "26.3"  # the pip that resolves (installed into the CPython 3.12 venv)
INDEX = "https://pypi.org/simple"
PYTHON_VERSION = "3.12"
# manylinux tags the image's glibc 2.39 accepts (newest first), as pip on Ubuntu 24.04 x86_64 lists them.
PLATFORMS = ([f"manylinux_2_{v}_x86_64" for v in range(39, 16, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"])
# Packages PyPI has only as sdists (both pure Python): built here to a wheel for the resolution; the image
# builds them from the sdist. deepspeed takes its pin from requirements.txt; antlr4-python3-runtime comes in
# through dvc -> hydra-core (antlr4-python3-runtime==4.9.*), whose last release, 4.9.3, is an sdist.
SDIST_ONLY = {"deepspeed": None, "antlr4-python3-runtime": "antlr4-python3-runtime==4.9.3"}
DEFAULT_CUTOFF = "2026-11-30T00:00:00Z"
# Marker environment of the image's interpreter (Ubuntu 24.04 python3 on x86_64).
TARGET_ENV = {"implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
              "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
              "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
              "python_version": PYTHON_VERSION, "sys_platform": "linux"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def req_name(line: str) -> str:
    return canon(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def merged_requirements(root: Path = ROOT) -> list[str]:
    """requirements.txt with requirements-gpu.txt's lines replacing those for the same package, then the
    GPU-only lines."""
    gpu = {req_name(l): l for l in requirement_lines(root / "requirements-gpu.txt")}
    out, seen = [], set()
    for line in requirement_lines(root / "requirements.txt"):
        n = req_name(line)
        out.append(gpu.get(n, line))
        seen.add(n)
    out += [l for n, l in gpu.items() if n not in seen]
    return out


def find_python312(explicit: str | None = None) -> str | None:
    cands = [explicit, os.environ.get("KAT_NB_PY312"), shutil.which("python3.12")]
    cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    for c in cands:
        if not c:
            continue
        try:
            v = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if v.returncode == 0 and v.stdout.strip() == PYTHON_VERSION:
            return c
    return None


def pip_env() -> dict:
    env = dict(os.environ)
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def transport_args() -> list[str]:
    """--cert where this machine's network needs a CA bundle (not part of the recorded command)."""
    cert = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ["--cert", cert] if cert else []


def run(cmd: list[str], **kw) -> None:
    r = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True, **kw)
    if r.returncode:
        sys.stderr.write(r.stdout[-6000:] + r.stderr[-6000:])
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")


def resolve_command(python: str, work: str, wheels: str, report: str, cutoff: str, inputs: str,
                    constraints: str) -> list[str]:
    cmd = [python, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
           "--report", report, "--target", f"{work}/target", "--index-url", INDEX,
           "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
           "--abi", "cp312"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["--uploaded-prior-to", cutoff, "--find-links", wheels, "-c", constraints, "-r", inputs]
    return cmd


def resolve(root: Path, cutoff: str, python: str, work: str) -> tuple[dict, list[str], str]:
    """Run the resolution; return (pip report, merged requirement lines, the command as text)."""
    venv = f"{work}/venv"
    run([python, "-m", "venv", venv])
    vpy = f"{venv}/bin/python"
    run([vpy, "-m", "pip", "--isolated", "install", "-q", "--index-url", INDEX, *transport_args(),
         f"pip=={PIP_VERSION}"], timeout=600)
    merged = merged_requirements(root)
    inputs = f"{work}/gpu-input.txt"
    Path(inputs).write_text("\n".join(merged) + "\n")
    wheels = f"{work}/wheels"
    pins = {req_name(l): l for l in merged}
    sdists = [pin or pins[n] for n, pin in SDIST_ONLY.items()]
    run([vpy, "-m", "pip", "--isolated", "wheel", "-q", "--no-deps", "--index-url", INDEX, *transport_args(),
         "--no-binary", ",".join(SDIST_ONLY), "--uploaded-prior-to", cutoff, "-w", wheels, *sdists],
        timeout=1800)
    report = f"{work}/report.json"
    cmd = resolve_command(vpy, work, wheels, report, cutoff, inputs, str(root / "constraints.txt"))
    run(cmd[:3] + transport_args() + cmd[3:], timeout=3600)
    shown = resolve_command("python3.12", "$TMP", "$TMP/wheels", "$TMP/report.json", cutoff,
                            "$TMP/gpu-input.txt", "constraints.txt")
    text = "PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT= " + " ".join(
        a if a.startswith("$") or " " not in a else repr(a) for a in shown)
    return json.loads(Path(report).read_text()), merged, text


def requested_extras(requires: dict[str, list[str]], inputs: list[str]) -> dict[str, set[str]]:
    """The extras of each package that something in the set asks for (walking from the inputs)."""
    from packaging.requirements import Requirement
    extras: dict[str, set[str]] = {n: set() for n in requires}
    todo, seen = [(Requirement(l), None) for l in inputs], set()
    while todo:
        r, extra = todo.pop()
        if r.marker and not r.marker.evaluate({**TARGET_ENV, "extra": extra or ""}):
            continue
        n = canon(r.name)
        for e in [None, *sorted(canon(x) for x in r.extras)]:
            if (n, e) in seen or n not in requires:
                continue
            seen.add((n, e))
            if e:
                extras[n].add(e)
            todo += [(Requirement(d), e) for d in requires[n]]
    return extras


def for_requested_extras(reqs: list[str], extras: set[str]) -> list[str]:
    """Requires-Dist lines less those that only apply to extras nothing requests."""
    from packaging.requirements import Requirement
    keep = []
    for d in reqs:
        m = Requirement(d).marker
        if m is None or "extra" not in str(m) or any(m.evaluate({**TARGET_ENV, "extra": e}) for e in extras):
            keep.append(d)
    return keep


def outputs(report: dict, merged: list[str], cutoff: str, command: str) -> tuple[str, str]:
    """(lock text, resolution JSON text) from a pip report."""
    requires, versions = {}, {}
    for item in report["install"]:
        m = item["metadata"]
        versions[canon(m["name"])] = m["version"]
        requires[canon(m["name"])] = m.get("requires_dist") or []
    extras = requested_extras(requires, merged)
    pkgs = {n: {"version": versions[n], "requires_dist": for_requested_extras(requires[n], extras[n]),
                "extras": sorted(extras[n])} for n in sorted(versions)}
    sd = ", ".join(f"{n}=={pkgs[n]['version']}" for n in SDIST_ONLY)
    head = [
        "# requirements-gpu.lock: GENERATED by `python docker/lock_gpu.py` (see its docstring); do not edit.",
        "# The whole GPU requirement set: requirements.txt + requirements-gpu.txt (whose lines replace",
        "# requirements.txt's for the same package), resolved by pip from PyPI for linux x86_64 / CPython 3.12",
        "# (Ubuntu 24.04, glibc 2.39). docker/Dockerfile installs exactly this list (pip --no-deps, then pip check).",
        f"# Only files uploaded to PyPI before the cutoff count (pip --uploaded-prior-to), so re-running reproduces it.",
        f"# uploaded-prior-to: {cutoff}",
        f"# resolver: pip {PIP_VERSION} in a CPython {PYTHON_VERSION} venv",
        f"# sdist-only on PyPI (built to a pure-Python wheel for the resolution, from the sdist in the image): {sd}",
        f"# Command, after `pip wheel --no-deps --no-binary {','.join(SDIST_ONLY)} -w $TMP/wheels <their pins>`, with $TMP/gpu-input.txt",
        "# = the merged requirement lines:",
        "#   " + command,
        "",
    ]
    lock = "\n".join(head) + "\n".join(f"{n}=={p['version']}" for n, p in pkgs.items()) + "\n"
    res = {
        "generated_by": "python docker/lock_gpu.py",
        "target": {"python_version": PYTHON_VERSION, "platform": PLATFORMS[0], "sys_platform": "linux",
                   "platform_machine": "x86_64"},
        "uploaded_prior_to": cutoff,
        "pip": PIP_VERSION,
        "inputs": merged,
        "note": "requires_dist: each package's Requires-Dist, less the lines only for extras nothing here requests",
        "packages": pkgs,
    }
    # One package per line: small diffs when the lock moves, still plain JSON.
    body = ",\n".join(f"  {json.dumps(n)}: {json.dumps(p, separators=(',', ':'))}" for n, p in pkgs.items())
    top = {k: v for k, v in res.items() if k != "packages"}
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in top.items())
    text += ',\n  "packages": {\n' + "\n".join("  " + l for l in body.splitlines()) + "\n  }\n}\n"
    json.loads(text)
    return lock, text


def recorded_cutoff(root: Path = ROOT) -> str:
    p = root / LOCK
    if p.exists():
        m = re.search(r"^# uploaded-prior-to: (\S+)$", p.read_text(), re.M)
        if m:
            return m.group(1)
    return DEFAULT_CUTOFF


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="write the lock and JSON under this folder")
    ap.add_argument("--uploaded-prior-to", default=None, help="PyPI cutoff (default: the one in the lock)")
    ap.add_argument("--python", default=None, help="a CPython 3.12 interpreter")
    a = ap.parse_args(argv)
    cutoff = a.uploaded_prior_to or recorded_cutoff()
    py = find_python312(a.python)
    if not py:
        raise SystemExit("no CPython 3.12 interpreter found (python3.12 on PATH, pyenv, --python, $KAT_NB_PY312)")
    with tempfile.TemporaryDirectory(prefix="kat-nb-gpu-lock-") as work:
        report, merged, command = resolve(ROOT, cutoff, py, work)
    lock, res = outputs(report, merged, cutoff, command)
    (a.out / "docker").mkdir(parents=True, exist_ok=True)
    (a.out / LOCK).write_text(lock)
    (a.out / RESOLUTION).write_text(res)
    n = sum(1 for l in lock.splitlines() if l and not l.startswith("#"))
    print(f"wrote {a.out / LOCK} ({n} packages) and {a.out / RESOLUTION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
