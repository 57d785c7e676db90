"""What a checkpoint's world episodes say, per trained and unseen bug kinds (README "Mid-training's claim").

    python scripts/world_transcripts.py . [sft]     # a repository (or clone) root and a checkpoint name

Reads `metrics/<checkpoint>/world.records.jsonl` and `data/world/test.jsonl`: episodes resolved and submitted, mean
turns, first `edit` whose reflection names the bug's line, episodes whose assistant turns say "variable" (the held-out
kind's name), and how many name each bug kind."""
import json, re, sys
from pathlib import Path
root = Path(sys.argv[1]); recs = root/"metrics"/(sys.argv[2] if len(sys.argv) > 2 else "sft")/"world.records.jsonl"
tasks = {t["id"]: t for t in map(json.loads, open(root/"data/world/test.jsonl"))}
import yaml
held = set(yaml.safe_load((root/"params.yaml").read_text())["data"]["world"]["held_out_bug_kinds"])
out = {}
for r in map(json.loads, open(recs)):
    t = tasks[r["task_id"]]; g = "unseen" if t["meta"]["bug_kind"] in held else "trained"
    d = out.setdefault(g, dict(n=0, resolved=0, submit=0, edited=0, first_edit_line=0, says_variable=0, turns=0, names=dict()))
    d["n"] += 1; d["resolved"] += bool(r["resolved"]); d["submit"] += r["finish"] == "submit"; d["turns"] += r["turns"]
    edits = [s for s in r["steps"] if s["tool"] == "edit"]
    if edits:
        d["edited"] += 1
        refl = r["messages"][edits[0]["message_index"] - 1]["content"] if r["messages"][edits[0]["message_index"]]["role"] != "assistant" else r["messages"][edits[0]["message_index"]]["content"]
        m = re.search(r"line (\d+)", refl)
        d["first_edit_line"] += bool(m and int(m.group(1)) == t["meta"]["bug_line"])
    texts = " ".join(m["content"] for m in r["messages"] if m["role"] == "assistant").lower()
    d["says_variable"] += "variable" in texts
    for k in ("off by one", "off-by-one", "comparison", "constant", "operator", "branch", "variable"):
        if k in texts: d["names"][k] = d["names"].get(k, 0) + 1
for g, d in out.items(): d["turns"] = round(d["turns"] / d["n"], 2)
print(json.dumps(out))
