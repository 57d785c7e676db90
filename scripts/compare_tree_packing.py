"""SFT (`kat_nb.sft.run_sft`, TRL's SFTTrainer) with and without `tree_packing` on the same world teacher trajectories,
same seed, one pass each over the same trajectories (`global_batch_size x seq_len` flat tokens per step): validation loss
on held-out trajectories (assistant tokens) and wall time. Every trajectory starts with the same system prompt and tool
schemas (~55 % of its tokens), which the tree computes once per step.
A second flat run with another seed measures the noise (batch order and initialisation).
Usage: python scripts/compare_tree_packing.py [N_TRAJECTORIES] [BATCH] [TREE_ROW_TOKENS]"""
import json, math, sys, tempfile, time
import torch
from transformers import AutoModelForCausalLM
from pathlib import Path
from kat_nb.model import build_model, row_text, train_tokenizer
from kat_nb.sft import run_sft, sft_dataset
from kat_nb.sft import sft_tree_seqs
from kat_nb.tree import flat_loss, tree_step_data
from kat_nb.world import make_world, teacher_trajectory

n = int(sys.argv[1]) if len(sys.argv) > 1 else 512
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
row_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
world = make_world(0, n_train=n, n_valid=48, n_test=1)
rows = lambda split: [r for r in map(teacher_trajectory, world[split]) if r["resolved"]]
train, valid = rows("train"), rows("valid")
tmp = Path(tempfile.mkdtemp())
tok = train_tokenizer([row_text(r) for r in train], vocab_size=2048)
cfg = dict(source="config", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
           intermediate_size=512, max_position_embeddings=2048, tie_word_embeddings=True, dtype="float32", attn_implementation="sdpa")
build_model(cfg, tok).save_pretrained(tmp/"init"); tok.save_pretrained(tmp/"init")
seq_len = 1024
base = dict(learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=5, weight_decay=0.0, global_batch_size=batch,
            per_device_batch_size=batch, seq_len=seq_len, packing=True, tree_normalize="token", tree_row_tokens=row_tokens,
            eval_steps=10**6, save_steps=10**6, logging_steps=10**6, save_total_limit=1, eval_samples=10**4, deepspeed=None,
            use_cpu=True, bf16=False)
vseqs = sft_tree_seqs(valid, tok, seq_len)
flat_steps = math.ceil(len(sft_dataset(train, tok, seq_len, True)) / batch)     # one pass over the packed flat rows
out = {"trajectories": len(train), "valid_trajectories": len(valid), "batch": batch}
for tree, seed in ((False, 0), (True, 0), (False, 1)):
    name = "tree" if tree else "flat" if seed == 0 else "flat_seed1"
    p = {**base, "tree_packing": tree, "max_steps": 10**6}
    if tree:    # one dataset item per step: count them
        p["max_steps"] = len(tree_step_data(sft_tree_seqs(train, tok, seq_len), sft_tree_seqs(valid[:1], tok, seq_len), p)[0])
    else: p["max_steps"] = flat_steps
    t0 = time.time()
    m = run_sft(train, valid, tmp/"init", p, tmp/name, None, seed=seed, echo=None)
    model = AutoModelForCausalLM.from_pretrained(str(tmp/name)).eval()
    with torch.no_grad(): exact = float(flat_loss(model, vseqs, normalize="token"))   # the same measure for both runs
    out[name] = {"val_loss_exact": round(exact, 4), "val_loss_start": round(m["val_loss_start"], 4), "val_loss_end": round(m["val_loss_end"], 4),
                                       "train_seconds": m["seconds"], "wall_seconds": round(time.time() - t0, 1),
                                       "steps": m["train_steps"], "loss_tokens": m["loss_tokens_per_epoch"]}
out["speedup"] = round(out["flat"]["train_seconds"] / out["tree"]["train_seconds"], 2)
out["val_loss_rel_diff"] = round(abs(out["tree"]["val_loss_exact"] - out["flat"]["val_loss_exact"]) / out["flat"]["val_loss_exact"], 4)
out["noise_rel_diff"] = round(abs(out["flat_seed1"]["val_loss_exact"] - out["flat"]["val_loss_exact"]) / out["flat"]["val_loss_exact"], 4)
out["tree_row_tokens"] = row_tokens
print(json.dumps(out))
