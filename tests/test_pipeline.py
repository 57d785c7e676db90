"""The pipeline end to end on the `smoke` profile, in a throwaway copy of the repository.

`dvc repro` runs data → tokenizer → midtrain → sft → rft → eval → report; a second `dvc repro` runs nothing; `dvc exp
run -S midtrain.<key>=…` reruns midtrain and what depends on it, not data or tokenizer; a `dvc repro` killed during mid-training resumes from the last
checkpoint; a code change retrains instead of resuming the finished run. Plus the runner's refusals: a bad params
key or type, a stage notebook without its `parameters` tag. And dvc.yaml's `kat_nb/*.py` deps against the import
closure of each stage notebook.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, yaml
from kat_nb.config import MATRIX, STAGES, load_params, stage_parameters
from kat_nb.pipeline import check_parameters, stage_notebook

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(repo: Path, **extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo), "KAT_NB_ROOT": str(repo), **extra}


def _sh(args, repo, check=True, timeout=900, **extra_env):
    r = subprocess.run(args, cwd=repo, env=_env(repo, **extra_env), capture_output=True, text=True, timeout=timeout)
    if check: assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def copy_repo(dst: Path, profile: str = "smoke") -> Path:
    "A fresh git repository holding the tracked (and untracked, not ignored) files of this checkout."
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT/f
        if src.is_file():
            (dst/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dst/f)
    for d in ("models", "runs", "dvclive", "build"): shutil.rmtree(dst/d, ignore_errors=True)
    params = yaml.safe_load((dst/"params.yaml").read_text()); params["base"]["profile"] = profile
    # the eval matrix on the checkpoints that act (base and midtrain score 0 on every suite): 4 suites x 3 + the teacher
    params["eval"]["checkpoints"] = [c for c in params["eval"]["checkpoints"] if c not in ("base", "midtrain")]
    (dst/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def _running_in(repo: Path) -> bool:
    "Whether any process works in `repo` (its cwd is there)."
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try:
            if Path(os.readlink(d/"cwd")).is_relative_to(repo): return True
        except OSError: pass
    return False


def kill_after_first_checkpoint(args, repo: Path, ckpts: Path, log: Path) -> list[int]:
    "Run `args`, SIGKILL its whole process group once a checkpoint under `ckpts` is complete; the steps saved by then."
    with open(log, "w") as logf:
        proc = subprocess.Popen(args, cwd=repo, env=_env(repo), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not any(ckpts.glob("checkpoint-*/trainer_state.json")): time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    # papermill's kernel runs in a session of its own (jupyter_client starts it so), so the group kill misses it; it
    # exits within a second or so of its parent (jupyter's parent poller) and may complete one more checkpoint meanwhile.
    # The checkpoints that count are the ones on disk once nothing of the run is left.
    deadline = time.time() + 60
    while time.time() < deadline and _running_in(repo): time.sleep(0.5)
    saved = sorted(int(c.name.split("-")[1]) for c in ckpts.glob("checkpoint-*") if (c/"trainer_state.json").exists())
    assert saved, f"no checkpoint was written before the kill:\n{log.read_text()[-3000:]}"
    return saved


def kill_then_resume(stage: str, repo: Path, log: Path, steps: int | None = None) -> tuple[list[int], dict]:
    """`dvc repro <stage>` killed after its first checkpoint, then run again: asserts the rerun resumed from the last
    checkpoint on disk (and, given the run's `steps`, that the kill came before the end); the saved steps and the metrics."""
    saved = kill_after_first_checkpoint(["dvc", "repro", stage], repo, repo/"models"/stage/"checkpoints", log)
    if steps is not None: assert saved[-1] < steps, f"the run finished before the kill (checkpoints {saved}): nothing to resume"
    r = _sh(["dvc", "repro", stage], repo)
    out = r.stdout + r.stderr
    assert "resuming from" in out and f"checkpoint-{saved[-1]}" in out, out[-3000:]
    return saved, json.loads((repo/"metrics"/f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.mark.xdist_group("pipeline")
def test_repro_then_nothing_then_only_dependents(smoke_repo):
    r = _sh(["dvc", "repro"], smoke_repo, timeout=1800)    # every stage and eval cell: ~12 min alone, more beside other tests
    for stage in ("data", "tokenizer", "midtrain", "sft", "rft", "r2d", "rl", "eval@rl-world", "eval@sft-world", "eval@rft-world", "eval@r2d-recovery",
                  "eval@r2d-ide", "baseline@recovery", "report"):
        assert f"Running stage '{stage}'" in r.stdout, r.stdout
    m = json.loads((smoke_repo/"metrics"/"midtrain.json").read_text())
    assert m["val_loss_end"] < m["val_loss_start"], m
    # the probe of what the commits taught: unseen commits of every kind, scored for the checkpoint and the model it started from
    assert {"midtrain", "base"} <= set(m["probe"]) and {"trained", "held_out"} <= set(m["probe"]["midtrain"]), m["probe"]
    assert m["probe"]["midtrain"]["trained"]["loss"] < m["probe"]["base"]["trained"]["loss"], m["probe"]
    kinds = json.loads((smoke_repo/"data"/"cards"/"midtrain.json").read_text())["kinds"]     # commits broad, trajectories narrow
    assert "wrong_variable" in kinds["diff"] and "wrong_variable" in kinds["test"] and "wrong_variable" not in kinds["agentic"], kinds
    rec = json.loads((smoke_repo/"metrics"/"midtrain.run.json").read_text())
    assert rec["profile"] == "smoke" and rec["seed"] == 0 and rec["versions"]["torch"].startswith("2.13") and rec["git"] != "unknown"
    assert (smoke_repo/"dvclive"/"midtrain"/"metrics.json").exists()
    assert (smoke_repo/"runs"/"03_midtrain.ipynb").exists()
    sft = json.loads((smoke_repo/"metrics"/"sft.json").read_text())                # SFT after mid-training, scored by eval
    assert sft["val_loss_end"] < sft["val_loss_start"] and (smoke_repo/"data"/"sft"/"coverage.json").exists(), sft
    world = json.loads((smoke_repo/"metrics"/"sft"/"world.json").read_text())
    assert "resolve_rate" in world and world["unseen_kinds/tasks"] >= 1 and world["seen_kinds/tasks"] >= 1, world   # the held-out kind apart
    assert 0 <= world["edit_turn/exact"] <= 1 and world["edit_turn/tasks"] == world["tasks"], world   # the teacher-forced diagnosis
    assert set(json.loads((smoke_repo/"metrics"/"summary.json").read_text())["world_by_kind"]["sft"]) == {"seen", "unseen"}
    rft = json.loads((smoke_repo/"metrics"/"rft.json").read_text())                # RFT from the SFT checkpoint, scored by eval
    assert rft["rft_steps"] == 2 and rft["rollouts_this_run"] == 8 and rft["references"]["references_min"] >= 4, rft
    assert "rft" in json.loads((smoke_repo/"metrics"/"summary.json").read_text())["world_resolve_rate"]
    assert (smoke_repo/"dvclive"/"rft"/"metrics.json").exists() and (smoke_repo/"data"/"rft"/"references.jsonl").exists()
    r2d = json.loads((smoke_repo/"metrics"/"r2d.json").read_text())                # R2D from the SFT checkpoint, on deployment-like traces
    assert r2d["train_steps"] == 4 and r2d["card"]["teacher_ide"]["traces"] == 4 and r2d["card"]["recovery"]["resolved_share"] == 1.0, r2d
    assert (smoke_repo/"data"/"r2d"/"traces.jsonl").exists() and "r2d" in json.loads((smoke_repo/"metrics"/"summary.json").read_text())["world_resolve_rate"]
    rl = json.loads((smoke_repo/"metrics"/"rl.json").read_text())                  # RL from the R2D checkpoint, scored by eval
    assert rl["steps"] == 2 and rl["rollout_seconds"] > 0 and (smoke_repo/"dvclive"/"rl"/"metrics.json").exists(), rl
    assert "rl" in json.loads((smoke_repo/"metrics"/"summary.json").read_text())["world_resolve_rate"]
    rec = json.loads((smoke_repo/"metrics"/"teacher"/"recovery.json").read_text())
    assert rec["resolve_rate"] == 1.0 and rec["variant/edit_fails/tasks"] + rec["variant/wrong_fix/tasks"] == rec["tasks"], rec
    # every stage that executes code records the isolation it ran under, and so does every evaluation's metrics
    want = "rlimits" if os.environ.get("KAT_NB_SANDBOX") == "rlimits" else "bwrap"
    for rec in ("data.run.json", "sft.run.json", "rft.run.json", "rl.run.json", "sft/world.run.json", "teacher/humaneval.run.json"):
        assert json.loads((smoke_repo/"metrics"/rec).read_text())["sandbox"]["backend"] == want, rec
    for m in ("sft/world.json", "teacher/world.json", "sft/humaneval.json", "r2d/recovery.json"):
        assert json.loads((smoke_repo/"metrics"/m).read_text())["sandbox"]["backend"] == want, m
    assert json.loads((smoke_repo/"metrics"/"midtrain.run.json").read_text())["sandbox"] == {"backend": want, "executes_code": False}

    t0 = time.time(); r2 = _sh(["dvc", "repro"], smoke_repo)
    assert "Running stage" not in r2.stdout and time.time() - t0 < 60, r2.stdout

    _sh(["git", "add", "-A"], smoke_repo); _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "lock"], smoke_repo)
    r3 = _sh(["dvc", "exp", "run", "-S", "midtrain.learning_rate=0.002", "-S", "sft.input=base"], smoke_repo, timeout=1800)
    for stage in ("midtrain", "sft", "rft", "r2d", "rl"): assert f"Running stage '{stage}'" in r3.stdout, r3.stdout   # and its dependents
    for stage in ("data", "tokenizer"): assert f"Running stage '{stage}'" not in r3.stdout, r3.stdout
    ran = json.loads((smoke_repo/"runs"/"04_sft.ipynb").read_text())["cells"]      # papermill's injected parameters
    assert any('input = "base"' in "".join(c["source"]) for c in ran), "sft.input=base did not reach the sft notebook"   # SFT from the untrained model


@pytest.mark.xdist_group("pipeline")
def test_killed_repro_resumes_from_last_checkpoint(tmp_path):
    repo = copy_repo(tmp_path/"repo")
    prof = repo/"configs"/"profiles"/"smoke.yaml"
    p = yaml.safe_load(prof.read_text())
    p["midtrain"].update(max_steps=300, save_steps=40, eval_steps=300)  # long enough to be killed mid-way
    prof.write_text(yaml.safe_dump(p))
    _sh(["dvc", "repro", "tokenizer"], repo, KAT_NB_SANDBOX="rlimits")          # the explicit opt-in: it runs, and says so
    for rec in ("data", "tokenizer"): assert json.loads((repo/"metrics"/f"{rec}.run.json").read_text())["sandbox"]["backend"] == "rlimits", rec
    saved = kill_after_first_checkpoint(["dvc", "repro"], repo, repo/"models"/"midtrain"/"checkpoints", tmp_path/"killed.log")
    r = _sh(["dvc", "repro"], repo)
    out = r.stdout + r.stderr
    assert "resuming from" in out and f"checkpoint-{saved[-1]}" in out, out[-3000:]
    m = json.loads((repo/"metrics"/"midtrain.json").read_text())
    assert m["train_steps"] == 300 and m["resumed_from"], m


@pytest.mark.xdist_group("pipeline")
def test_code_change_retrains_unchanged_rerun_resumes(tmp_path):
    repo = copy_repo(tmp_path/"repo")
    prof = repo/"configs"/"profiles"/"smoke.yaml"
    p = yaml.safe_load(prof.read_text())
    p["midtrain"].update(max_steps=4, save_steps=2, eval_steps=2, logging_steps=2, warmup_steps=1)
    prof.write_text(yaml.safe_dump(p))
    metrics = lambda: json.loads((repo/"metrics"/"midtrain.json").read_text())
    _sh(["dvc", "repro", "midtrain"], repo)
    first = metrics()
    assert first["resumed_from"] is None and first["train_steps"] == 4 and first["seconds"] > 0, first

    r = _sh(["dvc", "repro", "-f", "-s", "midtrain"], repo)          # unchanged: resumes the finished run, trains nothing
    out, again = r.stdout + r.stderr, metrics()
    assert "Running stage 'midtrain'" in r.stdout and "nothing to train" in out and "starting fresh" not in out, out[-3000:]
    assert again["resumed_from"].endswith("checkpoint-4") and again["seconds"] == 0.0, again

    train_py = repo/"kat_nb"/"train.py"                               # any change to its syntax tree is a code change
    train_py.write_text(train_py.read_text() + "\nRETRAIN_PROBE = 1\n")
    r = _sh(["dvc", "repro", "midtrain"], repo)
    out, fresh = r.stdout + r.stderr, metrics()
    assert "Running stage 'midtrain'" in r.stdout and "Running stage 'data'" not in r.stdout, r.stdout[-3000:]
    assert "other parameters, inputs or code" in out and "starting fresh" in out and "resuming from" not in out, out[-3000:]
    assert fresh["resumed_from"] is None and fresh["seconds"] > 0 and fresh["train_steps"] == 4, fresh


def test_without_a_sandbox_a_stage_that_executes_code_stops_before_it_runs(tmp_path):
    env = {k: v for k, v in _env(ROOT).items() if k != "KAT_NB_SANDBOX"} | {"KAT_NB_BWRAP": str(tmp_path/"no-bwrap")}
    for cmd in (["run", "data"], ["run", "sft"], ["run", "eval", "--cell", "checkpoint=teacher", "--cell", "suite=world"]):
        r = subprocess.run([str(BIN/"kat-nb"), *cmd, "--out-root", str(tmp_path/"out")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 3 and "sudo apt-get install bubblewrap" in r.stderr and "KAT_NB_SANDBOX=rlimits" in r.stderr, r.stderr
        assert not (tmp_path/"out").exists(), cmd                     # stopped before the notebook ran or wrote anything
    # `make repro` and `make test` check the sandbox before anything else
    for target, main in (("repro", "dvc repro"), ("test", "pytest")):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True).stdout
        assert "kat-nb sandbox --check" in dry and dry.index("kat-nb sandbox --check") < dry.index(main), dry


def test_dvc_deps_are_each_stage_notebooks_import_closure():
    from kat_nb.pipeline import module_closure, stage_modules
    stages = yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"]
    problems = []
    for name, st in stages.items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        nbs = [d for d in deps if d.startswith("build/stripped/") and d.endswith(".ipynb")]
        if name == "strip": want = module_closure(["pipeline"], ROOT)   # no notebook: it runs kat_nb.pipeline.strip_all
        else:
            assert len(nbs) == 1, f"dvc.yaml stage '{name}': expected one build/stripped/NN_<stage>.ipynb dep, found {nbs}"
            want = [f.stem for f in stage_modules(Path(nbs[0]).stem.split("_", 1)[1], ROOT)]
        listed, code = [Path(d).stem for d in deps if d.startswith("kat_nb/")], nbs[0] if nbs else "kat_nb.pipeline"
        problems += [f"dvc.yaml stage '{name}' does not list kat_nb/{m}.py, which {code} imports (directly or not)"
                     for m in sorted(set(want) - set(listed))]
        problems += [f"dvc.yaml stage '{name}' lists kat_nb/{m}.py, which {code} never imports"
                     for m in sorted(set(listed) - set(want))]
    assert not problems, "\n".join(problems)


def test_code_fingerprint_follows_behaviour_not_comments(tmp_path):
    from kat_nb.pipeline import fingerprint, stage_modules
    for d in ("kat_nb", "nbs/stages"):                                # a copy: the repository itself is never edited
        shutil.copytree(ROOT/d, tmp_path/d, ignore=shutil.ignore_patterns("__pycache__"))
    lib = tmp_path/"kat_nb"
    fp = lambda: fingerprint({"lr": 1e-3}, [], code=stage_modules("midtrain", tmp_path))
    fp0 = fp()
    assert lib/"tree.py" in stage_modules("midtrain", tmp_path)       # reached only through kat_nb.train
    assert lib/"eval.py" not in stage_modules("midtrain", tmp_path)
    tree = lib/"tree.py"
    src = tree.read_text()
    first = next(l for l in src.splitlines() if l.startswith(("import ", "from ")))
    tree.write_text("# a comment\n\n" + src.replace(first, first + "   # another", 1) + "\n\n# and one more\n")
    assert fp() == fp0, "a comment-only edit changed the code fingerprint"
    (lib/"eval.py").write_text((lib/"eval.py").read_text() + "\nUNRELATED = 1\n")
    assert fp() == fp0, "an edit to a module the stage does not import changed its code fingerprint"
    tree.write_text(tree.read_text() + "\nMAX_DEPTH = 64\n")
    fp1 = fp()
    assert fp1 != fp0, "a behaviour-changing edit left the code fingerprint unchanged"
    train = lib/"train.py"                                            # a new import (inside a function) joins the closure
    train.write_text(train.read_text() + "\ndef _probe():\n    from kat_nb.eval import evaluate\n    return evaluate\n")
    assert lib/"eval.py" in stage_modules("midtrain", tmp_path) and fp() != fp1


@pytest.mark.parametrize("bad,expected", [
    ({"midtrain": {"lerning_rate": 0.1}}, "midtrain.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"midtrain": {"max_steps": "lots"}}, "midtrain.max_steps:"),
    ({"data": {"world": {"n_train": -3}}}, "data.world.n_train:"),
])
def test_bad_params_name_key_and_file(tmp_path, bad, expected):
    p = yaml.safe_load((ROOT/"params.yaml").read_text())
    for sec, kv in bad.items():
        for k, v in kv.items():
            if isinstance(v, dict): p[sec][k].update(v)
            else: p[sec][k] = v
    f = tmp_path/"params.yaml"; f.write_text(yaml.safe_dump(p))
    r = subprocess.run([str(BIN/"kat-nb"), "run", "data", "--params", str(f)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and expected in r.stderr and "params.yaml" in r.stderr, r.stderr


def test_stage_notebook_without_parameters_tag_is_refused(tmp_path):
    import nbformat
    repo = copy_repo(tmp_path/"repo")
    nb_path = next((repo/"nbs"/"stages").glob("*_data.ipynb"))
    nb = nbformat.read(str(nb_path), as_version=4)
    for c in nb.cells: c.metadata.pop("tags", None)
    nbformat.write(nb, str(nb_path))
    r = _sh([str(BIN/"kat-nb"), "run", "data"], repo, check=False)
    assert r.returncode == 2 and "exactly one cell tagged 'parameters'" in r.stderr, r.stderr
    assert not (repo/"data"/"world").exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_notebook_takes_exactly_its_parameters(stage):
    "A key added to a params section must reach every stage notebook that reads the section (the report reads `eval:`)."
    params = load_params(ROOT/"params.yaml")
    check_parameters(stage_notebook(stage, ROOT), stage_parameters(stage, params, cell={k: "x" for k in MATRIX.get(stage, ())}))


def test_eval_cells_depend_on_every_scalar_eval_key():
    "The eval and baseline cells list every `eval:` key but the matrix's lists: a new key reruns them, a new checkpoint or suite does not."
    from kat_nb.config import EvalParams
    stages = yaml.safe_load((ROOT/"dvc.yaml").read_text())["stages"]
    want = {f"eval.{k}" for k in EvalParams.model_fields} - {"eval.checkpoints", "eval.suites"}
    for name in ("eval", "baseline"):
        got = {p for p in stages[name]["params"] if isinstance(p, str) and p.startswith("eval")}
        assert got == want, (name, sorted(got ^ want))
