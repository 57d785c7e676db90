"System-level tests of kat_nb.train: loss falls, resume after a kill, ZeRO-2 and ZeRO-3 in two CPU processes, the benchmark."
import json, os, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(source="config", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True,
            dtype="float32", attn_implementation="sdpa")

def params(**over):
    p = dict(max_steps=40, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=4, weight_decay=0.0,
             global_batch_size=8, per_device_batch_size=8, seq_len=64, packing=True, eval_steps=20, save_steps=20,
             logging_steps=5, save_total_limit=2, eval_samples=8, deepspeed=None, use_cpu=True, bf16=False)
    p.update(over); return p

def corpus(n=120):
    "Small mixed corpus: code-like text rows and chat rows with tool calls."
    rows = []
    for i in range(n):
        rows.append({"component": "code", "text": f"def f{i % 9}(x, y):\n    return x + y * {i % 5}\n" * (1 + i % 3)})
        if i % 3 == 0:
            call = {"type": "function", "function": {"name": "view_file", "arguments": {"path": f"m{i % 4}.py"}}}
            rows.append({"component": "agentic", "tools": [], "messages": [
                {"role": "user", "content": f"Fix f{i % 9}."}, {"role": "assistant", "content": "Plan: look.", "tool_calls": [call]},
                {"role": "tool", "name": "view_file", "content": f"def f{i % 9}(x):\n    return x - 1"},
                {"role": "assistant", "content": "Done."}]})
    return rows

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from kat_nb.model import train_tokenizer, row_text
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([row_text(r) for r in corpus()], vocab_size=320, min_frequency=2).save_pretrained(d)
    return d

# A script the subprocess tests run (directly, or under torchrun): trains with the JSON arguments it is given.
SCRIPT = textwrap.dedent('''
    import json, sys
    from kat_nb.train import run_midtrain
    a = json.loads(open(sys.argv[1]).read())
    m = run_midtrain(a["rows"], a["rows"][:12], a["tok_dir"], a["model"], a["params"], a["out"], a["live"], seed=0)
    print("METRICS " + json.dumps(m), flush=True)
''')

def write_job(tmp_path, tok_dir, **over):
    job = {"rows": corpus(), "tok_dir": str(tok_dir), "model": TINY, "params": params(**over),
           "out": str(tmp_path/"midtrain"), "live": str(tmp_path/"dvclive")}
    (tmp_path/"job.json").write_text(json.dumps(job)); (tmp_path/"train_job.py").write_text(SCRIPT)
    return [str(tmp_path/"train_job.py"), str(tmp_path/"job.json")]

def tsv_steps(path):
    head, *rows = Path(path).read_text().splitlines()
    i = head.split("\t").index("step")
    return [int(r.split("\t")[i]) for r in rows]

def metrics_of(stdout):
    """The last METRICS record in `stdout`. Two ranks print theirs at once, and `print` writes the text and its newline
    separately, so one line can hold both records ('METRICS {...}METRICS {...}'): each is decoded on its own."""
    found = [json.JSONDecoder().raw_decode(part)[0] for l in stdout.splitlines() for part in l.split("METRICS ")[1:] if part.startswith("{")]
    return found[-1]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "KAT_NB_ROOT": str(ROOT)}

def test_loss_falls(tmp_path, tok_dir):
    from kat_nb.train import run_midtrain
    rows = corpus()
    m = run_midtrain(rows, rows[:12], tok_dir, TINY, params(), tmp_path/"out", tmp_path/"live", seed=0, echo=None)
    assert m["val_loss_end"] < 0.5 * m["val_loss_start"], m
    assert m["train_steps"] == 40 and m["train_tokens"] > 0 and m["tokens_per_s"] > 0 and m["resumed_from"] is None
    live = json.loads((tmp_path/"live/metrics.json").read_text())
    assert live["val_loss_end"] == pytest.approx(m["val_loss_end"])
    steps = tsv_steps(tmp_path/"live/plots/metrics/train/loss.tsv")
    assert steps == list(range(5, 41, 5))
    for f in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path/"out"/f).exists(), f
    # a rerun of the finished run (the stage's fingerprint of params, inputs and code matches: `dvc repro -f`, a
    # comment-only edit, a new plot in the stage notebook) trains nothing more
    weights = (tmp_path/"out"/"model.safetensors").read_bytes()
    again = run_midtrain(rows, rows[:12], tok_dir, TINY, params(), tmp_path/"out", tmp_path/"live", seed=0, echo=None)
    assert again["train_steps"] == 40 and again["seconds"] == 0.0 and again["tokens_per_s"] is None
    assert again["resumed_from"].endswith("checkpoint-40") and again["val_loss_end"] == pytest.approx(m["val_loss_end"], rel=1e-5)
    assert not (tmp_path/"out"/"checkpoints"/"checkpoint-41").exists()
    assert (tmp_path/"out"/"model.safetensors").read_bytes() == weights

def test_resume_after_kill(tmp_path, tok_dir):
    cmd = [sys.executable, *write_job(tmp_path, tok_dir, max_steps=400, save_steps=10, eval_steps=200, logging_steps=10)]
    ckpts = tmp_path/"midtrain/checkpoints"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 120, "no checkpoint after 120 s"
        time.sleep(0.2)
    proc.kill(); proc.wait()
    start = json.loads((ckpts/"start.json").read_text())["val_loss_start"]   # measured before the first step
    from kat_nb.train import last_checkpoint
    ckpt, step = last_checkpoint(ckpts)
    assert step < 400
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from {ckpt} (step {step})" in out.stdout
    m = metrics_of(out.stdout)
    assert m["resumed_from"] == str(ckpt) and m["train_steps"] == 400 and m["val_loss_start"] == start
    assert m["val_loss_end"] < m["val_loss_start"]
    # the curve continues from the checkpoint: no step logged twice
    steps = tsv_steps(tmp_path/"dvclive/plots/metrics/train/loss.tsv")
    assert steps == sorted(set(steps)) and steps[-1] == 400

def two_process_run(tmp_path, tok_dir, zero_config:str, port:int):
    "4 midtrain steps in two CPU processes over gloo (torch.distributed.run) with a DeepSpeed config: (stdout, metrics, start time)."
    script = write_job(tmp_path, tok_dir, max_steps=4, global_batch_size=8, per_device_batch_size=4, eval_steps=2,
                       save_steps=2, logging_steps=1, deepspeed=str(ROOT/"configs"/zero_config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *script]
    t = time.time()
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout, metrics_of(out.stdout), t

def test_zero2_two_cpu_processes(tmp_path, tok_dir):
    "DeepSpeed ZeRO-2 (configs/zero2.json) in two CPU processes over gloo, through the HF Trainer."
    stdout, m, t = two_process_run(tmp_path, tok_dir, "zero2.json", 29517)
    assert m["train_steps"] == 4 and m["val_loss_end"] < m["val_loss_start"]
    assert "1 accum x 2 processes" in stdout
    assert (tmp_path/"midtrain/checkpoints/checkpoint-4").exists() and (tmp_path/"midtrain/model.safetensors").exists()
    print(f"zero2 two-process run: {time.time() - t:.1f} s")

def test_zero3_two_cpu_processes(tmp_path, tok_dir):
    """DeepSpeed ZeRO-3 (configs/zero3.json) in two CPU processes over gloo; the saved folder holds the full weights.

    Under ZeRO-3 each process holds only a shard of every parameter (the module's own tensors are empty
    placeholders); `Trainer.save_model` gathers them because zero3.json sets `stage3_gather_16bit_weights_on_model_save`.
    Plain `from_pretrained` of the saved folder (no DeepSpeed) must give the trained model: full shapes, a finite loss
    close to the run's final validation loss, weights that moved away from the initial model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kat_nb.core import set_seed
    from kat_nb.model import build_model, load_tokenizer, row_text
    from kat_nb.train import PackedCollator, lm_dataset
    stdout, m, t = two_process_run(tmp_path, tok_dir, "zero3.json", 29519)
    assert m["train_steps"] == 4 and m["val_loss_end"] < m["val_loss_start"] and "1 accum x 2 processes" in stdout
    ckpt = tmp_path/"midtrain/checkpoints/checkpoint-4"
    assert (ckpt/"global_step4").is_dir() and (ckpt/"trainer_state.json").exists()   # the sharded DeepSpeed state resumes
    model = AutoModelForCausalLM.from_pretrained(tmp_path/"midtrain")
    tok = AutoTokenizer.from_pretrained(tmp_path/"midtrain")
    emb = model.get_input_embeddings().weight
    assert tuple(emb.shape) == (model.config.vocab_size, TINY["hidden_size"]) == (len(tok), 64)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (TINY["hidden_size"], TINY["intermediate_size"])
    assert all(p.numel() > 0 and p.abs().sum() > 0 for p in model.parameters())
    valid = lm_dataset(map(row_text, corpus()[:12]), tok, 64, packing=True).select(range(8))   # the run's eval rows
    with torch.no_grad(): loss = model(**PackedCollator(tok.pad_token_id)([valid[i] for i in range(8)])).loss.item()
    assert abs(loss - m["val_loss_end"]) < 0.05 and loss < m["val_loss_start"] - 0.3, (loss, m)
    set_seed(0); initial = build_model(TINY, load_tokenizer(TINY, tok_dir))   # what run_midtrain started from
    moved = {k: (v - initial.state_dict()[k]).abs().max().item() for k, v in model.state_dict().items()}
    assert min(moved.values()) > 0, moved
    print(f"zero3 two-process run: {time.time() - t:.1f} s")

def test_bench_packed_vs_padded(tok_dir):
    from transformers import AutoTokenizer
    from kat_nb.train import PACKING_CONFIGS, bench_midtrain
    bench = bench_midtrain(corpus(), AutoTokenizer.from_pretrained(tok_dir), TINY, seq_len=64, batch_size=8, n_docs=64)
    assert [r["config"] for r in bench] == list(PACKING_CONFIGS)
    packed, tree, padded, srt = bench
    assert len({r["real_tokens"] for r in bench}) == 1 and packed["steps"] < padded["steps"] == srt["steps"]
    assert packed["vs_padded"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"])
    assert all(0 < r["mfu"] < 1 for r in bench)
