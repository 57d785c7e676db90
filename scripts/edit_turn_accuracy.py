"""How often a checkpoint gets the diagnosis right, teacher-forced: for each world task of a split, the teacher's clean
trajectory is fed in and the edit turn (its reflection and the edit's arguments) counts as right when the greedy
next-token prediction matches every one of its tokens. Less noisy than the resolve rate, and it tells underfitting
(train tasks wrong) from not generalising (only held-out ones wrong).

Usage: python scripts/edit_turn_accuracy.py MODEL_DIR [N_TASKS]   (needs data/world from `dvc repro`)"""
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from kat_nb.core import read_jsonl
from kat_nb.sft import sft_tokenize
from kat_nb.world import Task, teacher_trajectory

mdir, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100
tok, model = AutoTokenizer.from_pretrained(mdir), AutoModelForCausalLM.from_pretrained(mdir).eval()
for split in ("train", "valid", "test"):
    tasks = [Task.from_dict(d) for d in read_jsonl(f"data/world/{split}.jsonl")][:n]
    kinds = {}
    for t in tasks:
        rec = teacher_trajectory(t)
        edit = next(s["message_index"] for s in rec["steps"] if s["tool"] == "edit")
        msgs = [m if i == edit or m["role"] != "assistant" else {**m, "loss": False} for i, m in enumerate(rec["messages"])]
        enc = sft_tokenize([{**rec, "messages": msgs}], tok)
        x, y = torch.tensor(enc["input_ids"][0]), torch.tensor(enc["labels"][0])
        with torch.no_grad(): pred = model(x[None]).logits[0, :-1].argmax(-1)
        want = y[1:]; on = want != -100
        a, b = kinds.get(t.meta["bug_kind"], (0, 0)); kinds[t.meta["bug_kind"]] = (a + bool((pred[on] == want[on]).all()), b + 1)
    right = sum(a for a, _ in kinds.values())
    print(f"{split}: edit turn exactly right {right}/{len(tasks)}", {k: f"{a}/{b}" for k, (a, b) in sorted(kinds.items())})
