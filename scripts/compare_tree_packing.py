"""Mid-training's trainer (`kat_nb.train.run_midtrain`) with and without `tree_packing` on the same agentic rows,
same seed, one pass over the same documents each: validation loss at the end and wall time.
Every trajectory starts with the same system prompt and tool schemas, so the trees share that prefix.
Usage: python scripts/compare_tree_packing.py [N_TRAJECTORIES]"""
import math
import json, sys, tempfile, time
from pathlib import Path
from kat_nb.model import row_text, train_tokenizer
from kat_nb.train import lm_dataset, run_midtrain, tree_rows
from kat_nb.model import build_model
from kat_nb.world import make_world, teacher_trajectory

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
world = make_world(0, n_train=n, n_valid=16, n_test=1)
rows = lambda split: [{"component": "agentic", "messages": r["messages"], "tools": r["tools"]} for r in map(teacher_trajectory, world[split])]
train, valid = rows("train"), rows("valid")
tmp = Path(tempfile.mkdtemp())
tok = train_tokenizer([row_text(r) for r in train], vocab_size=1024); tok.save_pretrained(tmp/"tok")
model = dict(source="config", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=512, max_position_embeddings=2048, tie_word_embeddings=True, dtype="float32", attn_implementation="sdpa")
base = dict(max_steps=1, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.0, global_batch_size=4,
            per_device_batch_size=4, seq_len=1024, packing=True, eval_steps=10**6, save_steps=10**6, logging_steps=10**6,
            save_total_limit=1, eval_samples=64, deepspeed=None, use_cpu=True, bf16=False)
out = {}
n_rows = {False: len(lm_dataset(map(row_text, train), tok, 1024, True)), True: len(tree_rows(train, tok, build_model(model, tok), 1024))}
for tree in (False, True):
    t0 = time.time()
    steps = math.ceil(n_rows[tree] / base["global_batch_size"])          # one pass over the same documents
    m = run_midtrain(train, valid, tmp/"tok", model, {**base, "max_steps": steps, "tree_packing": tree}, tmp/f"run{tree}", None, seed=0, echo=None)
    out["tree" if tree else "flat"] = {"val_loss_start": round(m["val_loss_start"], 4), "val_loss_end": round(m["val_loss_end"], 4),
                                       "seconds": round(time.time() - t0, 1), "steps": m["train_steps"], "rows": n_rows[tree]}
print(json.dumps(out))
