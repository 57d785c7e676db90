"""scripts/gpu_check.sh: its CPU-runnable parts run here (`--cpu`), the report has every check, and a mismatch fails."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT/"scripts"/"gpu_check.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_cpu_mode_runs_and_reports(tmp_path):
    out = tmp_path/"report.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(ROOT/"scripts"/"gpu_check.sh"), "--cpu", "--out", str(out), "--steps", "4", "--tasks", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["env"]["device"] == "cpu" and rep["env"]["torch"] and rep["env"]["transformers"]
    c = rep["checks"]
    assert c["tree_attention"]["status"] == "pass" and c["tree_attention"]["pair"] == ["sdpa", "eager"]
    assert c["tree_attention"]["max_rel_err"] < 1e-3
    assert c["gpu_cells"]["status"] == "skipped" and "nbs/lib/12_tree.ipynb" in c["gpu_cells"]["notebooks"]
    p = c["pipeline"]
    assert p["status"] == "pass" and p["sft"]["val_loss_end"] < p["sft"]["val_loss_start"] and p["sft"]["precision"] == "fp32"
    assert 0 <= p["hf"]["resolve_rate"] <= 1 and p["vllm"] == {"skipped": "needs CUDA"}
    assert "tree_attention: pass" in r.stdout and "all checks passed" in r.stdout


def test_a_mismatch_fails():
    import torch
    gc = _module()
    a = {"loss": torch.tensor(2.0), "w": torch.tensor([1.0, -3.0]), "b": torch.tensor([0.5])}
    assert gc.compare(a, {k: v.clone() for k, v in a.items()}, 1e-3)["ok"]
    bad = {**a, "w": torch.tensor([1.0, -3.01])}                # one gradient off by 0.3%
    res = gc.compare(bad, a, 1e-3)
    assert not res["ok"] and res["worst"] == "w"
    with pytest.raises(AssertionError, match="different tensors"): gc.compare({"loss": a["loss"]}, a, 1e-3)


def test_without_cuda_the_gpu_mode_says_so(tmp_path):
    import torch
    if torch.cuda.is_available(): pytest.skip("a GPU is visible")
    r = subprocess.run([sys.executable, str(ROOT/"scripts"/"gpu_check.py"), "--out", str(tmp_path/"r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cpu" in r.stderr
