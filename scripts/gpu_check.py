"""The GPU check (`scripts/gpu_check.sh`): run it on a GPU machine after building the image or the GPU venv.

Within ~10 minutes it runs every check the GPU path needs and writes one JSON report (versions, device, each check's
status, timing and numbers); any mismatch fails the run (exit 1):

- `gpu_cells`: every notebook cell flagged `#| gpu`, through `nbdev_test --flags gpu` (the tree engine's flex_attention cell).
- `tree_attention`: the tree engine's loss and gradients on one packed batch of branching trajectories, flex_attention
  against sdpa on the same weights (fp32). On CPU (`--cpu`), eager against sdpa: flex_attention has no CPU backward.
- `pipeline`: a config-built model (the `tiny` profile's shape), a tokenizer trained here, SFT with TRL on world teacher
  trajectories (bf16 + DeepSpeed ZeRO-2 on a GPU; fp32 on CPU), then 20 held-out world tasks through the real environment
  with the HF policy, and with the vLLM policy where vLLM is installed: their greedy first turns must agree.

A check whose component is absent (vLLM, DeepSpeed) fails unless `--allow-missing` names it; then it is `missing` in the
report, with the install line. `--cpu` runs what a CPU can (tests/test_gpu_check.py runs it so in CI).
"""
from __future__ import annotations
import argparse, importlib, json, os, platform, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))


class Missing(Exception):
    "A component this check needs is not installed (reported as `missing`, a failure unless --allow-missing names it)."
    def __init__(self, component:str, why:str): super().__init__(f"{component}: {why}"); self.component = component


def version(mod:str) -> str|None:
    try: return importlib.import_module(mod).__version__
    except Exception: return None


def environment(device:str) -> dict:
    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": device,
           **{m: version(m) for m in ("torch", "transformers", "trl", "accelerate", "deepspeed", "vllm", "datasets")},
           "cuda": torch.version.cuda, "kat_nb_commit": _git("rev-parse", "HEAD")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                "gpus": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}
        smi = shutil.which("nvidia-smi")
        if smi: env["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                               text=True).stdout.strip()
    return env


def _git(*args) -> str|None:
    try: return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception: return None


def compare(a:dict, b:dict, rtol:float) -> dict:
    """Relative error between two {name: tensor} sets (loss and every gradient), each measured against the larger of its
    own scale and 1e-3 of the largest gradient (parameters whose gradient is 0 in theory). Raises on a missing key."""
    if set(a) != set(b): raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    floor = 1e-3 * max(float(v.abs().max()) for k, v in b.items() if k != "loss")
    err = {k: float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), floor, 1e-30) for k in b}
    worst = max(err, key=err.get)
    return {"loss_rel_err": err["loss"], "max_rel_err": err[worst], "worst": worst, "rtol": rtol, "ok": err[worst] <= rtol}


def tree_attention(device:str) -> dict:
    "Tree-packed loss + gradients of one batch under two attention implementations on the same weights."
    import torch
    from kat_nb.tree import build_trees, collate_tree_rows, pack_rows, random_branches, tiny_qwen3, tree_loss
    impls = ("sdpa", "flex_attention") if device == "cuda" else ("sdpa", "eager")
    batch = collate_tree_rows(pack_rows(build_trees(random_branches(5, n_branches=6, prefix=40, depth=3)), 256), normalize="branch")
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    out = {}
    for impl in impls:
        m = tiny_qwen3(hidden_size=64, attn_implementation=impl, seed=0).to(device)   # head_dim 16: flex_attention's minimum
        loss, _ = tree_loss(m, batch); loss.backward()
        out[impl] = {"loss": loss.detach()} | {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    res = compare(out[impls[1]], out[impls[0]], rtol=1e-3)
    if not res["ok"]: raise AssertionError(f"{impls[1]} vs {impls[0]}: {res}")
    return {"pair": list(impls), "loss": float(out[impls[0]]["loss"]), **res, "rows": int(batch["input_ids"].shape[0])}


def gpu_cells(device:str) -> dict:
    "Every `#| gpu` notebook cell, run by nbdev_test with the gpu flag (the rest of each notebook runs too, as nbdev does)."
    import nbformat
    nbs = sorted(p for p in (ROOT/"nbs").rglob("*.ipynb")
                 if any(c.cell_type == "code" and c.source.lstrip().startswith("#| gpu") for c in nbformat.read(p, as_version=4).cells))
    if device != "cuda": return {"skipped": "needs CUDA", "notebooks": [str(p.relative_to(ROOT)) for p in nbs]}
    exe = shutil.which("nbdev_test")
    if exe is None: raise Missing("nbdev", "nbdev_test is not on PATH (pip install -r requirements.txt)")
    runs = {}
    for p in nbs:
        t = time.time()
        r = subprocess.run([exe, "--flags", "gpu", "--path", p.name], cwd=p.parent, capture_output=True, text=True, timeout=480)
        runs[str(p.relative_to(ROOT))] = {"rc": r.returncode, "seconds": round(time.time() - t, 1)}
        if r.returncode != 0: raise AssertionError(f"nbdev_test --flags gpu {p.name} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return {"notebooks": runs}


def pipeline(device:str, tmp:Path, tasks:int=20, steps:int=30, allow:set=frozenset()) -> dict:
    "Tokenizer → config-built model → SFT (bf16 + ZeRO-2 on CUDA) → world evaluation with HF and (where installed) vLLM."
    from kat_nb.config import load_params
    from kat_nb.env import run_episodes, summarize
    from kat_nb.model import row_text, save_base, train_tokenizer
    from kat_nb.serve import make_policy
    from kat_nb.sft import run_sft
    from kat_nb.world import make_world, teacher_trajectory
    p = load_params(ROOT/"params.yaml", profile="tiny")
    world = make_world(0, n_train=48, n_valid=4, n_test=tasks)
    rows = [teacher_trajectory(t, seed=i) for i, t in enumerate(world["train"])]
    valid = [teacher_trajectory(t) for t in world["valid"]]
    tok = train_tokenizer([row_text(r) for r in rows], vocab_size=1024, min_frequency=2)
    base = save_base(p.model.model_dump(), tok, tmp/"base", seed=0)
    sft = p.sft.model_dump() | {"max_steps": steps, "warmup_steps": min(2, steps - 1), "eval_steps": steps, "save_steps": steps, "logging_steps": 10,
                                "eval_samples": 4, "turn_weights": None, "tree_packing": False}
    out = {"train_rows": len(rows), "steps": steps}
    if device == "cuda":
        try: import deepspeed  # noqa: F401
        except ImportError as e: raise Missing("deepspeed", f"{e} (pip install -r requirements-gpu.lock)")
        sft |= {"use_cpu": False, "bf16": True, "deepspeed": "configs/zero2.json"}
        # one process without a launcher: the env a launcher would set (DeepSpeed initialises torch.distributed from it)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29631"), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    m = run_sft(rows, valid, base, sft, tmp/"sft", None, seed=0, echo=None)
    out["sft"] = {k: m[k] for k in ("val_loss_start", "val_loss_end", "tokens_per_s", "seconds")} | {"precision": "bf16" if sft["bf16"] else "fp32",
                  "deepspeed": sft.get("deepspeed")}
    if not m["val_loss_end"] < m["val_loss_start"]: raise AssertionError(f"SFT did not lower the validation loss: {out['sft']}")
    test = world["test"][:tasks]
    t = time.time()
    hf = run_episodes(test, make_policy(tmp/"sft", "hf", max_new_tokens=64, batch_size=64), max_turns=4)
    out["hf"] = {k: summarize(hf)[k] for k in ("resolve_rate", "mean_turns")} | {"seconds": round(time.time() - t, 1)}
    if device != "cuda": out["vllm"] = {"skipped": "needs CUDA"}; return out
    try: pol = make_policy(tmp/"sft", "vllm", max_new_tokens=64, dtype="float32", gpu_memory_utilization=0.3)
    except ImportError as e:
        if "vllm" not in allow: raise Missing("vllm", str(e))
        out["vllm"] = {"missing": str(e)}; return out
    t = time.time()
    vl = run_episodes(test, pol, max_turns=4)
    same = sum(a["messages"][2]["content"] == b["messages"][2]["content"] and a["messages"][2].get("tool_calls") == b["messages"][2].get("tool_calls")
               for a, b in zip(hf, vl)) / len(test)
    out["vllm"] = {k: summarize(vl)[k] for k in ("resolve_rate", "mean_turns")} | {"seconds": round(time.time() - t, 1), "first_turn_agreement": same}
    if same < 0.8: raise AssertionError(f"vLLM and HF greedy first turns agree on {same:.0%} of {len(test)} tasks (fp32): {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU-runnable parts (CUDA-only checks are skipped)")
    ap.add_argument("--out", default=str(ROOT/"build"/"gpu_check.json"), help="the JSON report")
    ap.add_argument("--allow-missing", default="", help="comma-separated components whose absence is reported, not failed (vllm, deepspeed, nbdev)")
    ap.add_argument("--only", default="", help="comma-separated checks to run (gpu_cells, tree_attention, pipeline)")
    ap.add_argument("--steps", type=int, default=30, help="SFT steps of the pipeline check")
    ap.add_argument("--tasks", type=int, default=20, help="held-out world tasks the pipeline check evaluates")
    args = ap.parse_args(argv)
    import torch
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (run with --cpu for the CPU-runnable parts)", file=sys.stderr); return 2
    allow = {s for s in args.allow_missing.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    report = {"env": environment(device), "checks": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    checks = {"tree_attention": lambda: tree_attention(device), "gpu_cells": lambda: gpu_cells(device),
              "pipeline": lambda: pipeline(device, tmp, tasks=args.tasks, steps=args.steps, allow=allow)}
    failed = []
    for name, fn in checks.items():
        if only and name not in only: continue
        t = time.time()
        try: res = {"status": "pass", **fn()}
        except Missing as e:
            res = {"status": "missing" if e.component in allow else "fail", "error": str(e)}
        except Exception as e:
            res = {"status": "fail", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.time() - t, 1)
        if res.get("skipped"): res["status"] = "skipped"
        report["checks"][name] = res
        if res["status"] == "fail": failed.append(name)
        print(f"gpu_check: {name}: {res['status']} ({res['seconds']} s)" + (f": {res['error']}" if 'error' in res else ""), flush=True)
    report["ok"] = not failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu_check: report {args.out}; " + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}"), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__": sys.exit(main())
