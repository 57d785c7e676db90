"The executable tasks in other languages (kat_nb.polyglot, kat_nb.toolchains): renderers, runners, judge, teacher."
import logging, os, random

import pytest

import kat_nb.toolchains as tc
from kat_nb.bugs import BUG_KINDS
from kat_nb.polyglot import (LANGS, TEMPLATES, Undefined, apply_site, bug_sites, file_names, harness, polyglot_tasks, render, run_fn,
                             visible_tests)
from kat_nb.tasks import check_task, run_hidden_tests
from kat_nb.teacher import teacher_trajectory
from kat_nb.tools import Workspace

HERE = [l for l in LANGS if tc.toolchain(l) is not None]


def test_this_machine_runs_at_least_eight_languages():
    "Eight languages execute (CI installs the toolchains, so there this fails instead of skipping; a laptop without one gets text-only tasks)."
    if len(HERE) < 8 and not os.environ.get("CI"): pytest.skip(f"only {HERE} execute here; see README (Debian packages)")
    assert len(HERE) >= 8, f"only {HERE} execute here; .ci/run installs the Debian packages the README lists"


# --- the interpreter ---------------------------------------------------------------------------------

def test_interpreter_refuses_what_languages_disagree_on():
    fn = TEMPLATES["max_of"](random.Random(0))
    assert run_fn(fn, ((3, 9, 4),)) == 9
    with pytest.raises(Undefined): run_fn(fn, ((),))                          # xs[0] of an empty list
    sd = TEMPLATES["safe_divide"](random.Random(0))
    assert run_fn(sd, (7, 2)) == 3 and run_fn(sd, (7, 0)) == 0
    ds = TEMPLATES["digit_sum"](random.Random(0)); n = ds.params[0][0]
    hang = apply_site(ds, (1, 2, 1), ("set", n, ("var", n)))                  # n never shrinks
    with pytest.raises(Undefined, match="hang"): run_fn(hang, (12,))


# --- every template in every language computes what the interpreter computes --------------------------

@pytest.mark.parametrize("lang", LANGS)
def test_renderings_agree_with_the_interpreter(lang):
    "Each language runs a third of the templates (rotated, so every template runs in some languages): harness and visible tests."
    if lang not in HERE: pytest.skip(f"no {lang} toolchain here")
    rng, li = random.Random(f"render:{lang}"), LANGS.index(lang)
    for ti, (name, make) in enumerate(TEMPLATES.items()):
        fn = make(rng)
        if (ti + li) % 3: continue
        want = [run_fn(fn, c) for c in fn.cases]
        mfile, tfile, hfile = file_names(fn, lang)
        files = {mfile: render(fn, lang), tfile: visible_tests(fn, lang, list(zip(fn.cases, want))[:3], ["test_a", "test_b", "test_c"])}
        r = tc.judge_harness(files, lang, {hfile: harness(fn, lang, fn.cases)}, [str(w) for w in want])
        assert r.ok, (name, r.stdout, r.stderr)
        with Workspace(files) as ws:
            out = ws.call("run_tests", {})
        assert out["exit_code"] == 0 and out["observation"].endswith("3 passed"), (name, out)


# --- bugs, tasks, the runner's report --------------------------------------------------------------------

def test_every_bug_kind_has_sites_and_changes_one_place():
    rng = random.Random(0)
    fns = [make(rng) for make in TEMPLATES.values()]
    for kind in BUG_KINDS:
        sites = [(fn, s) for fn in fns for s in bug_sites(fn, kind)]
        assert sites, kind
        fn, (path, new) = sites[0]
        a, b = render(fn, "c").splitlines(), render(apply_site(fn, path, new), "c").splitlines()
        if kind != "missing_branch": assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, kind
        else: assert len(b) < len(a)
    with pytest.raises(ValueError, match="unknown bug kind"): bug_sites(fns[0], "typo")


@pytest.fixture(scope="module")
def tasks():
    return polyglot_tasks(0, "test", HERE, 3)


def test_tasks_are_deterministic_and_well_formed(tasks):
    again = polyglot_tasks(0, "test", HERE, 3)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks]
    assert polyglot_tasks(1, "test", HERE[:1], 3)[0].id != tasks[0].id
    for t in tasks[::3]:                       # one per language: the buggy code fails its hidden tests, the fix passes
        assert check_task(t), (t.language, t.meta["description"])
        assert t.meta["expected"] and all(v.lstrip("-").isdigit() for v in t.meta["expected"])   # kept here, not in a file


def test_the_visible_tests_show_the_issue(tasks):
    for t in tasks[::3]:
        with Workspace(t.files) as ws: out = ws.call("run_tests", {})
        assert out["exit_code"] not in (0, None), (t.language, out)
        assert f"FAILED test_issue_example: {t.meta['issue_call']} returned" in out["observation"], (t.language, out["observation"])


def test_the_teacher_resolves_them(tasks):
    recs = [teacher_trajectory(t) for t in tasks]
    assert all(r["resolved"] for r in recs), [(t.language, t.meta["description"]) for t, r in zip(tasks, recs) if not r["resolved"]]


# --- the judge cannot be fooled --------------------------------------------------------------------------

def test_forged_frames_and_early_exits_fail(tasks):
    t = next(t for t in tasks if t.language == "c")
    fixed, mod = t.solutions[0], t.meta["module"]
    assert run_hidden_tests(t, fixed).ok
    frames = "".join(f'    printf("@@KATNB {i} {v}\\n");\n' for i, v in enumerate(t.meta["expected"]))
    forged = {**t.files, mod: t.files[mod] + "\n__attribute__((constructor)) static void forge(void) {\n" + frames + "}\n"}
    assert not run_hidden_tests(t, forged).ok                                   # every case then appears twice
    early = {**t.files, mod: fixed[mod] + "\n#include <stdlib.h>\n__attribute__((constructor)) static void quit(void) { exit(0); }\n"}
    assert not run_hidden_tests(t, early).ok                                    # no frame at all
    js = next(t for t in tasks if t.language == "javascript")
    m = js.meta["module"]
    assert not run_hidden_tests(js, {**js.files, m: js.solutions[0][m] + "\nconsole.log('@@KATNB 0 1');\n"}).ok
    assert run_hidden_tests(js, js.solutions[0]).ok


def test_frames_are_read_strictly():
    frames, problems = tc.read_frames("@@KATNB 0 5\nnoise\n@@KATNB 1 7\n@@KATNB 0 5\n@@KATNB x 1\n")
    assert frames == {0: "5", 1: "7"} and any("twice" in p for p in problems) and any("malformed" in p for p in problems)


# --- a missing toolchain makes text-only tasks, never a crash ----------------------------------------------

def test_a_missing_toolchain_warns_and_the_tool_says_what_to_install(tasks, monkeypatch, caplog):
    t = next(t for t in tasks if t.language == "rust")
    real = tc._resolve_tool
    monkeypatch.setattr(tc, "_resolve_tool", lambda name: None if name == "rustc" else real(name))
    tc.toolchain.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kat_nb.toolchains"):
            assert "rust" not in tc.available(LANGS)
        assert any("Rust tasks are text-only" in r.message and "rustc" in r.message for r in caplog.records)
        with Workspace(t.files) as ws: out = ws.call("run_tests", {})
        assert out["status"] == "error" and "no Rust toolchain" in out["observation"]  and "Debian: rustc" in out["observation"]
        with pytest.raises(tc.ToolchainMissing): run_hidden_tests(t, t.solutions[0])
    finally:
        monkeypatch.undo(); tc.toolchain.cache_clear()
    assert tc.toolchain("rust") is not None


# --- feature implementation and test writing ------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_tasks():
    from kat_nb.polyglot import archetype_tasks
    return (archetype_tasks(0, "test", HERE, 1, "feature implementation")
            + archetype_tasks(0, "test", HERE, 1, "test case generation"))


def test_feature_and_test_writing_tasks_hold_and_the_teacher_solves_them(other_tasks):
    assert {t.family for t in other_tasks} == {"feature", "testgen"} and {t.language for t in other_tasks} == set(HERE)
    for t in other_tasks:
        assert check_task(t), (t.language, t.family)                 # the stub / the missing tests fail; the solution passes
    recs = [teacher_trajectory(t) for t in other_tasks]
    assert all(r["resolved"] for r in recs), [(t.language, t.family) for t, r in zip(other_tasks, recs) if not r["resolved"]]
    assert recs[0]["messages"][0]["content"] == other_tasks[0].meta["system"]


def test_written_tests_must_catch_the_mutant(other_tasks):
    "A test file that checks nothing (passes on the module and the mutant alike) or that is missing does not resolve it."
    trivial = {"python": "", "c": "int main(void) { return 0; }\n", "cpp": "int main() { return 0; }\n", "javascript": "\n",
               "rust": "fn main() {}\n", "perl": "1;\n", "shell": "true\n"}
    for t in [t for t in other_tasks if t.family == "testgen"]:
        mod, tfile = t.meta["module"], t.meta["test_file"]
        good = t.solutions[0][tfile]
        assert run_hidden_tests(t, {mod: t.files[mod], tfile: good}).ok, t.language
        assert run_hidden_tests(t, {mod: t.meta["mutant"], tfile: good}).ok, t.language   # the judge puts the original module back
        nothing = trivial.get(t.language, f"public class {tfile[:-5]} {{ public static void main(String[] a) {{}} }}\n")
        assert not run_hidden_tests(t, {mod: t.files[mod], tfile: nothing}).ok, (t.language, "checks nothing")
        assert not run_hidden_tests(t, {mod: t.files[mod]}).ok, (t.language, "no test file")


def test_held_out_kinds_stay_out_of_the_train_split():
    from kat_nb.polyglot import make_polyglot_world
    w = make_polyglot_world(0, HERE[:2], n_train=6, n_test=6, n_train_other=3, n_test_other=1)
    assert {t.meta.get("bug_kind") for t in w["train"]} - {None} == set(BUG_KINDS) - {"wrong_variable"}   # test-writing mutants too
    assert "wrong_variable" in {t.meta.get("bug_kind") for t in w["test"]}
    assert not {t.id for t in w["train"]} & {t.id for t in w["test"]}
