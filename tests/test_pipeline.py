"""The pipeline end to end on the `smoke` profile, in a throwaway copy of the repository.

`dvc repro` runs data → tokenizer → midtrain → sft → eval → report; a second `dvc repro` runs nothing; `dvc exp
run -S midtrain.<key>=…` reruns midtrain and what depends on it, not data or tokenizer; a `dvc repro` killed during mid-training resumes from the last
checkpoint. Plus the runner's refusals: a bad params key or type, a stage notebook without its
`parameters` tag.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(repo: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo), "KAT_NB_ROOT": str(repo)}


def _sh(args, repo, check=True, timeout=900):
    r = subprocess.run(args, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout)
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
    (dst/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.mark.xdist_group("pipeline")
def test_repro_then_nothing_then_only_dependents(smoke_repo):
    r = _sh(["dvc", "repro"], smoke_repo)
    for stage in ("data", "tokenizer", "midtrain", "sft", "eval@sft-world", "report"): assert f"Running stage '{stage}'" in r.stdout, r.stdout
    m = json.loads((smoke_repo/"metrics"/"midtrain.json").read_text())
    assert m["val_loss_end"] < m["val_loss_start"], m
    rec = json.loads((smoke_repo/"metrics"/"midtrain.run.json").read_text())
    assert rec["profile"] == "smoke" and rec["seed"] == 0 and rec["versions"]["torch"].startswith("2.13") and rec["git"] != "unknown"
    assert (smoke_repo/"dvclive"/"midtrain"/"metrics.json").exists()
    assert (smoke_repo/"runs"/"03_midtrain.ipynb").exists()
    sft = json.loads((smoke_repo/"metrics"/"sft.json").read_text())                # SFT after mid-training, scored by eval
    assert sft["val_loss_end"] < sft["val_loss_start"] and (smoke_repo/"data"/"sft"/"coverage.json").exists(), sft
    world = json.loads((smoke_repo/"metrics"/"sft"/"world.json").read_text())
    assert "resolve_rate" in world and world["unseen_kinds/tasks"] >= 1 and world["seen_kinds/tasks"] >= 1, world   # the held-out kind apart
    assert set(json.loads((smoke_repo/"metrics"/"summary.json").read_text())["world_by_kind"]["sft"]) == {"seen", "unseen"}

    t0 = time.time(); r2 = _sh(["dvc", "repro"], smoke_repo)
    assert "Running stage" not in r2.stdout and time.time() - t0 < 60, r2.stdout

    _sh(["git", "add", "-A"], smoke_repo); _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "lock"], smoke_repo)
    r3 = _sh(["dvc", "exp", "run", "-S", "midtrain.learning_rate=0.002"], smoke_repo)
    assert "Running stage 'midtrain'" in r3.stdout and "Running stage 'sft'" in r3.stdout, r3.stdout   # and its dependents
    for stage in ("data", "tokenizer"): assert f"Running stage '{stage}'" not in r3.stdout, r3.stdout


@pytest.mark.xdist_group("pipeline")
def test_killed_repro_resumes_from_last_checkpoint(tmp_path):
    repo = copy_repo(tmp_path/"repo")
    prof = repo/"configs"/"profiles"/"smoke.yaml"
    p = yaml.safe_load(prof.read_text())
    p["midtrain"].update(max_steps=300, save_steps=40, eval_steps=300)  # long enough to be killed mid-way
    prof.write_text(yaml.safe_dump(p))
    _sh(["dvc", "repro", "tokenizer"], repo)
    with open(tmp_path/"killed.log", "w") as logf:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=_env(repo), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ckpts = repo/"models"/"midtrain"/"checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not any(ckpts.glob("checkpoint-*/trainer_state.json")): time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    saved = sorted(int(c.name.split("-")[1]) for c in ckpts.glob("checkpoint-*") if (c/"trainer_state.json").exists())
    assert saved, "no checkpoint was written before the kill"
    r = _sh(["dvc", "repro"], repo)
    out = r.stdout + r.stderr
    assert "resuming from" in out and f"checkpoint-{saved[-1]}" in out, out[-3000:]
    m = json.loads((repo/"metrics"/"midtrain.json").read_text())
    assert m["train_steps"] == 300 and m["resumed_from"], m


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
