"""Trustworthy results: host-side tools never read through a link out of the workspace, and no trick scores as a pass.

Item 4 and 5 of the trustworthy-execution issue. Every workspace tool and scorer is tried with links made by a `run`
call inside the sandbox (under bubblewrap and under the fallback), and the known ways to fake a pass are tried on the
world's hidden tests (directly and through an episode) and on HumanEval; real solutions still pass.
"""
import json, os, shutil, sys, tempfile, uuid
from pathlib import Path

import pytest

from kat_nb.sandbox import new_workspace
from kat_nb.world import Workspace, make_world, run_hidden_tests
from kat_nb.judge import judge, count_tests
from kat_nb.eval import check_humaneval, humaneval_problems
from test_sandbox import iso, require_bwrap   # noqa: F401  (the backend fixture: bwrap, rlimits)


@pytest.fixture(scope="module")
def task():
    return make_world(0, n_train=1, n_valid=1, n_test=3)["test"][0]


@pytest.fixture
def host_secret():
    d = Path(tempfile.mkdtemp(prefix="katnb-host-")); m = f"HOSTSECRET{uuid.uuid4().hex[:8]}"
    (d/"secret.txt").write_text(f"the {m} line\n"); (d/"sub").mkdir(); (d/"sub"/"deep.py").write_text(f"# {m}\n")
    yield d, m
    shutil.rmtree(d, ignore_errors=True)


# --- host-side tools and links -------------------------------------------------------------------------------

def test_no_tool_reads_through_a_symlink_made_in_the_sandbox(iso, task, host_secret, monkeypatch):
    monkeypatch.setenv("KAT_NB_SANDBOX", iso if iso == "rlimits" else "auto")
    d, m = host_secret
    module = task.meta["module"]                                    # e.g. "mathutils.py"
    with Workspace.from_task(task) as ws:
        r = ws.call("run", {"command": f"ln -s {d}/secret.txt leak.txt; ln -s {d} outdir; ln -s {d}/secret.txt link_{module}; "
                                       f"ln -s {module} alias.py; ls"})
        assert r["status"] == "ok" and "leak.txt" in r["observation"] and "alias.py" in r["observation"], r
        obs = {name: ws.call(name, args)["observation"] for name, args in [
            ("view_file", {"path": "leak.txt"}), ("view_file", {"path": "outdir/secret.txt"}),
            ("search", {"pattern": m}), ("search", {"pattern": m, "path": "outdir"}), ("search", {"pattern": m, "path": "leak.txt"}),
            ("edit", {"path": "leak.txt", "old": "the", "new": "THE"}), ("create_file", {"path": "leak.txt", "content": "x"}),
            ("create_file", {"path": "outdir/new.txt", "content": "x"})]}
        for name, o in obs.items(): assert f"the {m}" not in o and f"# {m}" not in o, (name, o)   # (a search echoes its pattern)
        assert ws.call("view_file", {"path": "leak.txt"})["status"] == "error"
        assert ws.call("search", {"pattern": m})["observation"].startswith("no matches")
        assert (d/"secret.txt").read_text() == f"the {m} line\n" and not (d/"new.txt").exists()   # nothing written through it
        files = ws.files()
        assert not any(m in t for t in files.values()), files
        assert "leak.txt" not in files and "alias.py" in files, sorted(files)
        # a link between two files of the repository still works
        assert ws.call("view_file", {"path": "alias.py"})["status"] == "ok"
        # the scorer gets only the repository's own files: the solution is still judged on its merits
        assert run_hidden_tests(task, {**files, **task.solutions[0]}).ok


def test_no_tool_reads_through_a_hard_link(task, host_secret, monkeypatch):
    "Under the fallback a `run` can hard-link a file of the same file system (e.g. another workspace in /dev/shm)."
    monkeypatch.setenv("KAT_NB_SANDBOX", "rlimits")
    _, m = host_secret
    other = new_workspace("katnb-other-"); (other/"hidden_test.py").write_text(f"# {m}\n")
    try:
        with Workspace.from_task(task) as ws:
            r = ws.call("run", {"command": f"ln {other}/hidden_test.py grabbed.py && echo linked"})
            if "linked" not in r["observation"]: pytest.skip(f"no hard link possible here: {r['observation']}")
            for name, args in [("view_file", {"path": "grabbed.py"}), ("search", {"pattern": m}),
                               ("edit", {"path": "grabbed.py", "old": "#", "new": "!"}), ("create_file", {"path": "grabbed.py", "content": "x"})]:
                o = ws.call(name, args)
                assert f"# {m}" not in o["observation"] and (name == "search" or o["status"] == "error"), (name, o)
            assert "grabbed.py" not in ws.files() and (other/"hidden_test.py").read_text() == f"# {m}\n"
    finally: shutil.rmtree(other, ignore_errors=True)


def test_under_bubblewrap_a_hard_link_out_cannot_even_be_made(task, host_secret):
    require_bwrap()
    other = new_workspace("katnb-other-"); (other/"x.py").write_text("secret\n")
    try:
        with Workspace.from_task(task) as ws:
            r = ws.call("run", {"command": f"ln {other}/x.py g.py; ln /usr/bin/id g2; ls"})
            assert "g.py" not in r["observation"].split() and "g2" not in r["observation"].split(), r
    finally: shutil.rmtree(other, ignore_errors=True)


# --- scores that cannot be gamed -------------------------------------------------------------------------------

def _tricks(task):
    "Modules that try to pass the hidden tests without fixing the bug."
    func = task.meta["func_name"]
    return {
        "os._exit(0) at import": "import os\nos._exit(0)\n",
        "os._exit(0) in the function": f"import os\ndef {func}(*a, **k):\n    os._exit(0)\n",
        "sys.exit(0) at import": "import sys\nsys.exit(0)\n",
        "sys.exit(0) in the function": f"import sys\ndef {func}(*a, **k):\n    sys.exit(0)\n",
        "an always-equal result": f"class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\ndef {func}(*a, **k):\n    return E()\n",
        "a str subclass equal to anything": f"class S(str):\n    def __eq__(self, o): return True\ndef {func}(*a, **k):\n    return S()\n",
        "monkeypatching the test module": (f"import sys, gc\nfor o in gc.get_objects():\n    if isinstance(o, dict) and o.get('__name__') == '__test__':\n"
                                           f"        for k in list(o):\n            if k.startswith('test'): o[k] = lambda: None\n"
                                           f"def {func}(*a, **k):\n    return None\n"),
        "patching AssertionError and builtins": (f"import builtins\nbuiltins.AssertionError = type('A', (Exception,), {{}})\n"
                                                 f"builtins.__import__ = None\ndef {func}(*a, **k):\n    return None\n"),
        "printing a fake success line": f"import sys, os\nsys.stdout.write('3 passed\\n'); sys.stdout.flush(); os.write(1, b'3 passed\\n')\nos._exit(0)\n",
        "reading the hidden tests": (f"import os\ndef {func}(*a, **k):\n    for f in os.listdir('.'):\n        if f.startswith('test'): return open(f).read()\n"
                                     f"    return None\n"),
        "killing the judge": f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef {func}(*a, **k):\n    return None\n",
    }


def test_no_trick_passes_the_hidden_tests(iso, task, monkeypatch):
    monkeypatch.setenv("KAT_NB_SANDBOX", iso if iso == "rlimits" else "auto")
    mod = task.meta["module"]
    for name, src in _tricks(task).items():
        r = run_hidden_tests(task, {**task.files, mod: src})
        assert not r.ok, (name, r)
    for sol in task.solutions: assert run_hidden_tests(task, sol).ok
    assert not run_hidden_tests(task, task.files).ok


def test_a_gaming_episode_is_not_resolved(task):
    "Through the environment: the policy overwrites the module with a trick and submits."
    from kat_nb.env import run_episodes
    mod = task.meta["module"]
    class Gamer:
        name = "gamer"
        def __init__(self, src): self.src = src
        def act(self, episodes):
            turn = ([{"name": "create_file", "arguments": {"path": mod, "content": self.src}}] if e.turns == 0 else
                    [{"name": "submit", "arguments": {}}] for e in episodes)
            return ["<tool_call>\n" + json.dumps(t[0]) + "\n</tool_call>" for t in turn]
    for name in ("os._exit(0) at import", "an always-equal result", "printing a fake success line"):
        rec = run_episodes([task], Gamer(_tricks(task)[name]))[0]
        assert rec["finish"] == "submit" and not rec["resolved"], (name, rec["finish"])
    rec = run_episodes([task], Gamer(task.solutions[0][mod]))[0]
    assert rec["resolved"], rec["finish"]


def test_no_trick_passes_humaneval(iso, monkeypatch):
    monkeypatch.setenv("KAT_NB_SANDBOX", iso if iso == "rlimits" else "auto")
    p = humaneval_problems(3)[2]                                      # truncate_number: returns a float
    e = p["entry_point"]
    tricks = {"os._exit": "    import os; os._exit(0)\n", "sys.exit": "    import sys; sys.exit(0)\n",
              "exit at import": "    return 0\nimport os\nos._exit(0)\n",
              "always equal": "    class E(float):\n        def __eq__(self, o): return True\n        def __sub__(self, o): return 0.0\n    return E()\n",
              "patch check": "    import sys\n    for m in list(sys.modules.values()):\n        if hasattr(m, 'check'): m.check = lambda c: None\n    return -1.0\n",
              "fake output": "    print('passed'); import os; os._exit(0)\n",
              "redefinition that exits": f"```python\nimport os\ndef {e}(x):\n    os._exit(0)\n```"}
    res = {k: check_humaneval(p, v)["passed"] for k, v in tricks.items()}
    assert res == {k: False for k in tricks}, res
    assert check_humaneval(p, p["canonical_solution"])["passed"]


def test_the_verdict_needs_every_test_and_this_runs_nonce(task):
    assert count_tests(task.tests) >= 3
    # a test file that defines fewer tests than the host counted cannot pass (e.g. a test lost to an import error)
    broken = {k: v.replace("def test", "def _t", 1) for k, v in task.tests.items()}
    assert count_tests(broken) == count_tests(task.tests) - 1
    assert judge(task.solutions[0], task.tests).ok


def test_every_canonical_humaneval_solution_passes_the_judge():
    "The judge is sound on the whole suite: 164/164 canonical solutions pass (the notebook's `slow` cell does the same)."
    from kat_nb.eval import evaluate_humaneval
    m, res = evaluate_humaneval("teacher")
    assert m["problems"] == 164 and m["passed"] == 164, [r for r in res if not r["passed"]][:3]
