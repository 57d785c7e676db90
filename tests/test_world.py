"System-level checks of the task world (kat_nb.world) and the sandbox (kat_nb.sandbox)."
import ast, difflib, hashlib, inspect, json, os, random, subprocess, sys, time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
import multiprocessing as mp
from pathlib import Path

import pytest

from kat_nb.sandbox import execute
from kat_nb.world import (BUG_KINDS, TEMPLATES, TOOLS, Task, Workspace, bug_sites, check_task, compatible_templates, error_masked,
                          inject_bug, make_world, run_hidden_tests, teacher_trajectory, trajectory_chars)


def _digest(world) -> str:
    return hashlib.sha256(json.dumps({k: [t.to_dict() for t in v] for k, v in world.items()}, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_train=300, n_valid=30, n_test=90)


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex: yield ex


# --- determinism and splits ---------------------------------------------------------------------

def test_same_seed_same_world_different_seed_different(world):
    assert _digest(make_world(0, n_train=300, n_valid=30, n_test=90)) == _digest(world)
    assert _digest(make_world(1, n_train=300, n_valid=30, n_test=90)) != _digest(world)


def test_world_does_not_depend_on_hash_seed(world):
    "Nothing iterates a set of strings: another PYTHONHASHSEED gives the same world."
    code = ("import hashlib, json; from kat_nb.world import make_world; w = make_world(0, n_train=300, n_valid=30, n_test=90); "
            "print(hashlib.sha256(json.dumps({k: [t.to_dict() for t in v] for k, v in w.items()}, sort_keys=True).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == _digest(world)


def test_test_split_does_not_depend_on_n_train(world):
    other = make_world(0, n_train=20, n_valid=30, n_test=90)
    assert [t.id for t in other["test"]] == [t.id for t in world["test"]]


def test_splits_held_out_kinds_and_no_sharing(world):
    kinds = {s: Counter(t.meta["bug_kind"] for t in ts) for s, ts in world.items()}
    assert {s: len(ts) for s, ts in world.items()} == {"train": 300, "valid": 30, "test": 90}
    assert "wrong_variable" not in kinds["train"] and "wrong_variable" not in kinds["valid"]
    assert kinds["test"]["wrong_variable"] == 30 and len(kinds["test"]) == 6      # held-out and seen kinds in test
    assert set(kinds["train"]) == set(BUG_KINDS) - {"wrong_variable"}
    ids = [t.id for ts in world.values() for t in ts]
    assert len(ids) == len(set(ids))
    modules = {s: {t.files[t.meta["module"]] for t in ts} for s, ts in world.items()}
    assert not (modules["train"] & modules["test"]) and not (modules["valid"] & modules["test"])
    assert not (modules["train"] & modules["valid"])
    assert all(t.meta["split"] == s for s, ts in world.items() for t in ts)


def test_other_held_out_kinds():
    w = make_world(3, n_train=40, n_valid=5, n_test=30, held_out_bug_kinds=("missing_branch", "off_by_one"))
    assert {t.meta["bug_kind"] for t in w["train"] + w["valid"]}.isdisjoint({"missing_branch", "off_by_one"})
    assert {"missing_branch", "off_by_one"} <= {t.meta["bug_kind"] for t in w["test"]}
    with pytest.raises(ValueError, match="held_out_bug_kinds"): make_world(0, 1, 1, 1, held_out_bug_kinds=("typo",))


def test_task_round_trip_and_shape(world):
    for t in world["train"][:20] + world["test"][:20]:
        d = json.loads(json.dumps(t.to_dict()))
        assert Task.from_dict(d) == t
        assert (t.family, t.language, t.archetype) == ("bugfix", "python", "debugging and bug fixing")
        assert t.difficulty in ("easy", "medium", "hard") and t.issue and len(t.files) == 2
        assert not set(t.tests) & set(t.files)                        # hidden tests are not in the repository
        assert all(set(s) == set(t.files) for s in t.solutions)       # solutions are complete repositories
        assert t.meta["issue_call"] in t.issue


def test_issues_vary(world):
    openings = Counter(t.issue.split()[0] for t in world["train"])
    assert len(openings) >= 5


# --- bug injection -------------------------------------------------------------------------------

def test_every_bug_kind_applies_to_several_templates():
    compat = compatible_templates()
    for kind in BUG_KINDS: assert len(compat[kind]) >= 4, (kind, compat[kind])
    assert len(TEMPLATES) >= 10


def test_inject_bug_on_templates_is_one_line():
    for name, make in TEMPLATES.items():
        module, func, source, doc, cases = make(random.Random(0))
        for kind in BUG_KINDS:
            bug = inject_bug(source, kind, random.Random(1), func_name=func)
            if bug is None: continue
            ast.parse(bug.source)
            diff = [l for l in difflib.ndiff(source.splitlines(), bug.source.splitlines()) if l[:1] in "+-"]
            assert len(diff) == 2 or (kind == "missing_branch" and all(l[0] == "-" for l in diff)), (name, kind, diff)


@pytest.mark.parametrize("modname", ["textwrap", "json.decoder", "fractions", "statistics", "shlex"])
def test_inject_bug_on_stdlib_files(modname):
    import importlib
    src = Path(inspect.getsourcefile(importlib.import_module(modname))).read_text()
    for kind in BUG_KINDS:
        for s in range(3):
            bug = inject_bug(src, kind, random.Random(s))
            assert bug is not None, (modname, kind)
            ast.parse(bug.source)
            assert bug.source != src and bug.original == src and bug.func_name
            assert len(bug.source.splitlines()) >= len(src.splitlines()) - 30
            assert bug.fix_diff().startswith("--- a/module.py")


def test_inject_bug_not_applicable_and_deterministic():
    assert inject_bug("x = 1\n", "operator_swap", random.Random(0)) is None
    assert inject_bug("def f(:", "comparison_flip", random.Random(0)) is None
    src = inspect.getsource(json.dumps)
    a = [inject_bug(src, k, random.Random(5)) for k in BUG_KINDS]
    b = [inject_bug(src, k, random.Random(5)) for k in BUG_KINDS]
    assert a == b
    assert bug_sites(src, "wrong_variable", func_name="no_such_function")[1] == []


# --- tasks are well formed ------------------------------------------------------------------------

def test_check_task_for_100_tasks_of_every_kind(pool):
    w = make_world(11, n_train=500, n_valid=0, n_test=150)       # 100 of each seen kind; 50 + 50 wrong_variable
    extra = make_world(12, n_train=0, n_valid=0, n_test=150)["test"]
    tasks = w["train"] + [t for t in w["test"] + extra if t.meta["bug_kind"] == "wrong_variable"][:100]
    by_kind = Counter(t.meta["bug_kind"] for t in tasks)
    assert all(by_kind[k] == 100 for k in BUG_KINDS), by_kind
    results = list(pool.map(check_task, tasks, chunksize=25))
    bad = [(t.id, t.meta["description"]) for t, ok in zip(tasks, results) if not ok]
    assert not bad, bad[:5]


def test_buggy_module_fails_hidden_tests_with_a_readable_report(world):
    t = world["train"][0]
    r = run_hidden_tests(t, t.files)
    assert not r.ok and "FAILED test_" in r.stdout and "failed," in r.stdout
    assert run_hidden_tests(t, t.solutions[0]).ok


def test_module_named_like_stdlib_does_not_break_the_runner(world):
    t = world["train"][0]
    files = {**t.solutions[0], "signal.py": "raise SystemExit('shadowed')\n", "linecache.py": "raise SystemExit('x')\n"}
    assert run_hidden_tests(t, files).ok
    assert not run_hidden_tests(t, {**t.files, "ast.py": "raise SystemExit('x')\n"}).ok


# --- the teacher -----------------------------------------------------------------------------------

def _check_record(rec, task):
    assert set(rec) == {"task_id", "family", "split", "seed", "tools", "messages", "steps", "tree", "resolved"}
    assert rec["tools"] == TOOLS and rec["task_id"] == task.id and rec["tree"]["parent_id"] is None
    msgs = rec["messages"]
    assert [m["role"] for m in msgs[:2]] == ["system", "user"] and msgs[1]["content"] == task.issue
    assert msgs[2]["content"].startswith("Plan:")
    assert all(m["content"].startswith("Reflection:") for m in msgs[3:] if m["role"] == "assistant")
    for s in rec["steps"]:
        call, result = msgs[s["message_index"]], msgs[s["message_index"] + 1]
        assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == s["tool"]
        assert result["role"] == "tool" and result["name"] == s["tool"]
        assert isinstance(call["tool_calls"][0]["function"]["arguments"], dict)
    assert rec["steps"][-1]["tool"] == "submit"
    json.dumps(rec)


def test_teacher_resolves_train_and_test_tasks(world, pool):
    tasks = world["train"][:60] + world["test"][:60]
    recs = list(pool.map(teacher_trajectory, tasks, chunksize=10))
    for rec, t in zip(recs, tasks): _check_record(rec, t)
    assert all(r["resolved"] for r in recs), [r["task_id"] for r in recs if not r["resolved"]]
    assert all([s["exit_code"] for s in r["steps"] if s["tool"] == "run_tests"] == [1, 0] for r in recs)
    chars = [trajectory_chars(r)["assistant"] for r in recs]
    assert 200 <= sum(chars) / len(chars) <= 450, sum(chars) / len(chars)
    edits = [r["messages"][6]["tool_calls"][0]["function"]["arguments"] for r in recs]
    lines = [t.files[t.meta["module"]].splitlines() for t in tasks]
    assert all(e["old"] in ls or "\n" in e["old"] for e, ls in zip(edits, lines) if "line" not in e)   # whole lines
    scoped = [e for e in edits if "line" in e]                      # line-scoped: only the changed text, unique on its line
    assert len(scoped) >= len(edits) // 2 and all(ls[e["line"] - 1].count(e["old"]) == 1 for e, ls in zip(edits, lines) if "line" in e)


def test_teacher_recovers_from_a_rejected_edit(world, pool):
    tasks = world["train"][:40]
    recs = list(pool.map(partial(teacher_trajectory, mistake=True), tasks, chunksize=10))
    for rec, t in zip(recs, tasks):
        _check_record(rec, t)
        assert rec["resolved"] and [s["tool"] for s in rec["steps"]] == ["view_file", "run_tests", "edit", "edit", "run_tests", "submit"]
        assert [s["status"] for s in rec["steps"]] == ["ok", "ok", "error", "ok", "ok", "ok"]
        bad = rec["messages"][6]["tool_calls"][0]["function"]["arguments"]
        assert bad["line"] != t.meta["bug_line"] and rec["messages"][7]["content"].startswith("Error: edit: old text occurs 0 times")
        assert rec["messages"][8] == teacher_trajectory(t)["messages"][6]    # then the clean trajectory's edit
        masked = error_masked(rec)
        assert [i for i, m in enumerate(masked["messages"]) if m.get("loss") is False] == [6]
        assert rec["messages"][6].get("loss") is None                       # the record itself is not changed
    clean = teacher_trajectory(tasks[0])
    assert error_masked(clean) is clean and teacher_trajectory(tasks[0], mistake=True) == recs[0]


def test_teacher_is_deterministic(world):
    t = world["test"][0]
    a, b = teacher_trajectory(t, seed=3), teacher_trajectory(t, seed=3)
    assert a == b


# --- tools ----------------------------------------------------------------------------------------

def test_line_scoped_edit():
    src = "def f(x):\n    if x < 1:\n        return x + 1\n    return x - 1\n"
    with Workspace({"m.py": src}) as ws:
        for args, err in [({"line": 2, "old": ">", "new": "<"}, "occurs 0 times on line 2"), ({"line": 9, "old": "x", "new": "y"}, "has no line 9"),
                          ({"line": 3, "old": "r", "new": "R"}, "occurs 2 times on line 3"), ({"line": "2", "old": "<", "new": ">"}, "must be an integer"),
                          ({"line": True, "old": "<", "new": ">"}, "must be an integer"), ({"line": 2, "old": "", "new": ">"}, "'old' is empty")]:
            r = ws.call("edit", {"path": "m.py", **args})
            assert r["status"] == "error" and err in r["observation"], (args, r)
        assert ws.files() == {"m.py": src}
        r = ws.call("edit", {"path": "m.py", "line": 3, "old": "+", "new": "-"})         # '+' is on lines 3 only, '-' also on 4
        assert r == {"observation": "Edited m.py (line 3).", "status": "ok", "exit_code": None}
        assert ws.files()["m.py"] == src.replace("x + 1", "x - 1")
        assert ws.call("edit", {"path": "m.py", "old": "x - 1", "new": "0"})["status"] == "error"   # without line: not unique


def test_bad_tool_calls_are_error_observations(world):
    t = world["train"][1]
    mod = t.meta["module"]
    with Workspace.from_task(t) as ws:
        calls = [("nope", {}), ("view_file", {}), ("view_file", {"path": "missing.py"}), ("view_file", {"path": "/etc/passwd"}),
                 ("view_file", {"path": "../x.py"}), ("edit", {"path": mod, "old": "not in the file", "new": "x"}),
                 ("edit", {"path": mod, "old": " ", "new": "x"}), ("edit", {"path": mod, "old": "", "new": "x"}),
                 ("edit", {"path": mod, "old": "a"}), ("view_file", {"path": mod, "extra": "1"}), ("run", {"command": 5}),
                 ("run", "{not json"), ("run", [1, 2]), ("search", {"pattern": "x", "path": "nowhere"})]
        for name, args in calls:
            r = ws.call(name, args)
            assert r["status"] == "error" and r["exit_code"] is None and r["observation"].startswith("Error:"), (name, args, r)
        assert ws.files() == t.files                                   # nothing changed
        ok = ws.call("view_file", {"path": mod})
        assert ok["status"] == "ok" and ok["observation"].startswith("1\t")
        assert ws.call("search", {"pattern": "def ("})["status"] == "ok"   # a bad regex is searched literally
        assert ws.call("create_file", {"path": "sub/new.py", "content": "x = 1\n"})["observation"] == "Created sub/new.py."
        r = ws.call("run", {"command": "cat sub/new.py; echo err >&2; exit 4"})
        assert (r["status"], r["exit_code"]) == ("ok", 4) and "x = 1" in r["observation"] and "err" in r["observation"]
        assert ws.call("submit", {})["observation"] == "Submitted." and ws.submitted


def test_run_tests_reports_syntax_errors_and_hangs():
    with Workspace({"m.py": "def f(:\n", "test_m.py": "from m import f\ndef test_a():\n    assert f() == 1\n"}) as ws:
        r = ws.call("run_tests", {})
        assert r["status"] == "ok" and r["exit_code"] == 1 and "SyntaxError" in r["observation"]
    with Workspace({"m.py": "def f():\n    while True: pass\n", "test_m.py": "from m import f\ndef test_a():\n    assert f() == 1\n"}) as ws:
        t0 = time.monotonic(); r = ws.call("run_tests", {})
        assert r["exit_code"] == 1 and "TimeoutError" in r["observation"] and time.monotonic() - t0 < 6
    with Workspace({"a.py": ""}) as ws:
        assert ws.call("run_tests", {})["status"] == "error"


# --- sandbox ----------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try: state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError): return False
    return state != "Z"


def _sleepers(arg: str) -> list[int]:
    hits = []
    for d in os.listdir("/proc"):
        if not d.isdigit(): continue
        try:
            if Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", arg.encode()] and _alive(int(d)): hits.append(int(d))
        except OSError: pass
    return hits


def test_timeout_kills_the_process_group(tmp_path):
    arg = f"{100 + random.random():.6f}"               # a unique `sleep` argument: the background child, seen from the host
    t0 = time.monotonic()
    r = execute(["sh", "-c", f"sleep {arg} & sleep 100"], workspace=tmp_path, timeout=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and time.monotonic() - t0 < 3
    for _ in range(50):
        if not _sleepers(arg): break
        time.sleep(0.05)
    assert not _sleepers(arg)


def test_sandbox_limits():
    r = execute([sys.executable, "-S", "-c", "print('y' * 10**6)"], max_output=100_000)
    assert r.ok and len(r.stdout) < 100_200 and "truncated" in r.stdout
    r = execute(["yes"], max_output=1000, timeout=5)
    assert r.killed_reason == "output_limit" and r.wall_s < 3
    r = execute([sys.executable, "-S", "-c", "b = bytearray(3 * 2**30)"], memory_mb=512)
    assert not r.ok and "MemoryError" in r.stderr
    r = execute([sys.executable, "-S", "-c", "import os; print(os.environ['HOME'] == os.getcwd(), sorted(os.environ)[:3])"])
    assert r.stdout.startswith("True")
    assert execute(["definitely-not-a-program"]).exit_code == 127
