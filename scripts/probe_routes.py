"""Which routes does a checkpoint sample? G episodes per task at a temperature; the turn counts and tool sequences of the
resolved ones (issue 15: RL can only shorten episodes toward routes the policy already samples).

    python scripts/probe_routes.py models/r2d --temperature 0.7 --slice 8:24   # the rl stage's chosen tasks 8..23

Tasks: `models/rl/checkpoints/tasks.json` (the rl stage's choice, hardest first) when it exists, else the train split.
Session 20 (seed 0, models/r2d, T 0.7, slice 8:24, G 8): 128 episodes, 16 resolved, all 5+ turns (13 x 5, 2 x 6, 1 x 7).
"""
import argparse, collections, json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint"); ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--slice", default="0:16", help="start:end of the task list"); ap.add_argument("--group-size", type=int, default=8)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kat_nb.core import read_jsonl
    from kat_nb.env import HFPolicy
    from kat_nb.rl import rollout_groups
    from kat_nb.tasks import Task
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(a.checkpoint), AutoTokenizer.from_pretrained(a.checkpoint)
    pool = {r["id"]: Task.from_dict(r) for r in read_jsonl(ROOT/"data"/"world"/"train.jsonl")}
    chosen = ROOT/"models"/"rl"/"checkpoints"/"tasks.json"
    ids = json.loads(chosen.read_text())["tasks"] if chosen.exists() else list(pool)
    lo, hi = map(int, a.slice.split(":"))
    policy = HFPolicy(model, tok, name="probe", max_new_tokens=128, batch_size=64, temperature=a.temperature, cross_turn_cache=True)
    recs, stats = rollout_groups([pool[i] for i in ids[lo:hi]], policy, a.group_size, max_turns=8, max_chars=12000,
                                 tool_timeout=10, max_format_errors=2)
    won = [r for r in recs if r["resolved"]]
    name = lambda c: c["function"]["name"] if "function" in c else c.get("name")
    print(json.dumps({"episodes": len(recs), "resolved": len(won), "stats": stats,
                      "resolved_turns": dict(sorted(collections.Counter(r["turns"] for r in won).items())),
                      "routes": [[list(k), n] for k, n in collections.Counter(
                          tuple(name(c) for m in r["messages"] if m["role"] == "assistant" for c in m.get("tool_calls") or [])
                          for r in won).most_common(10)]}, indent=1))
