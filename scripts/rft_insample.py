"""In-sample check of the RFT update: the same train tasks every step. Does the sampled pass rate on them rise?

The held-out split asks whether RFT transfers; this asks the narrower question whether the update learns at all (a sign
or masking error in the loss would show as no rise here). It probes the SFT policy greedily on `--candidates` train
tasks of the rft stage's seeded order, keeps `--tasks` it fails (topped up with solved ones), and runs `kat_nb.rft.run_rft`
on those same tasks for `--steps` steps (each step: `group_size` rollouts per task, one update). Every per-step line it
prints is the rollouts of that step: `rollouts: resolved ...` is the sampled pass rate before the step's update.

    python scripts/rft_insample.py --lr 5e-4 --optimizer adamw --drift off     # ~6 min on 2 cores
"""
import argparse, json, random, tempfile

from kat_nb.config import load_params
from kat_nb.core import from_root, read_jsonl
from kat_nb.env import HFPolicy
from kat_nb.rft import build_references, run_rft, select_tasks
from kat_nb.tasks import Task

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--drift", default="off", choices=["off", "stop", "correct"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--model", default=str(from_root("models/sft")))
    a = ap.parse_args()
    params = load_params()
    P = params.rft.model_dump()
    pool = [Task.from_dict(r) for r in read_jsonl(from_root("data/world/train.jsonl"))]
    random.Random(f"rft:{params.base.seed}").shuffle(pool)         # the rft stage's order
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(a.model), AutoModelForCausalLM.from_pretrained(a.model)
    probe = HFPolicy(model, tok, name="probe", max_new_tokens=P["max_new_tokens"], batch_size=64, cross_turn_cache=True)
    tasks, card = select_tasks(pool, a.tasks, probe, "unsolved", a.candidates, P)
    print(card, flush=True)
    refs = build_references(tasks, P["references"], workers=P["reference_workers"])
    rft = {**P, "steps": a.steps, "tasks_per_step": a.tasks, "learning_rate": a.lr, "optimizer": a.optimizer,
           "drift_mode": a.drift, "save_every": a.steps + 1}
    rft["minibatch_size"] = a.tasks * rft["group_size"]
    with tempfile.TemporaryDirectory() as d:
        out = run_rft(tasks, refs, a.model, rft, d, None, seed=params.base.seed)
    print(json.dumps({k: out[k] for k in ("reward_first", "reward_last", "seconds")}))
