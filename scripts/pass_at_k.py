"""How much an RL stage could gain at most: greedy resolve rate against pass@1 and pass@k of sampled episodes on the
held-out test split, per bug kind. RL sharpens the policy toward what it already samples sometimes; a task no sample
out of k resolves gives it no signal. pass@k is the ceiling on what sharpening can make greedy resolve.

Usage: python scripts/pass_at_k.py MODEL_DIR [TEMPERATURE=0.7] [K=8] [N_TASKS=100]   (needs data/world from `dvc repro`)
Prints one JSON object: per kind {n, pass1, passk}; `all` adds the seconds it took (2 cores: ~35 min for 800 episodes)."""
import collections, json, sys, time
from kat_nb.core import read_jsonl
from kat_nb.env import HFPolicy, run_episodes
from kat_nb.world import Task

model = sys.argv[1]
T, K, N = (float(sys.argv[2]) if len(sys.argv) > 2 else 0.7), (int(sys.argv[3]) if len(sys.argv) > 3 else 8), \
          (int(sys.argv[4]) if len(sys.argv) > 4 else 100)
tasks = [Task.from_dict(d) for d in read_jsonl("data/world/test.jsonl")][:N]
pol = HFPolicy.from_pretrained(model, max_new_tokens=128, batch_size=128, temperature=T, cross_turn_cache=True)
t0 = time.time()
recs = run_episodes([t for t in tasks for _ in range(K)], pol, max_turns=8)        # the eval's episode limits
by = collections.defaultdict(list)
for i, t in enumerate(tasks): by[t.meta.get("bug_kind")].append([recs[i * K + j]["resolved"] for j in range(K)])
row = lambda v: {"n": len(v), "pass1": round(sum(map(sum, v)) / (K * len(v)), 3), f"pass{K}": round(sum(any(r) for r in v) / len(v), 3)}
out = {k: row(v) for k, v in sorted(by.items())}
out["all"] = row([r for v in by.values() for r in v]) | {"temperature": T, "seconds": round(time.time() - t0)}
print(json.dumps(out))
