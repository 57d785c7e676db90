"""Checkpoints any harness can serve: a trained checkpoint folder, driven as an agent by a process that never imports
kat_nb (plain transformers, the folder's tools.json, system prompt and chat template, Hermes-style <tool_call> parsing,
exactly the model card's own snippet), makes a well-formed view_file call. And the vllm backend's clear error."""
import json, os, re, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    "A tiny config-built model trained to open the issue's file first (the teacher's first turn), saved as a stage saves it."
    import torch
    from kat_nb.model import build_model, render_chat, train_tokenizer
    from kat_nb.serve import write_serving_files
    from kat_nb.world import make_world, teacher_trajectory, TOOLS
    torch.manual_seed(0)
    task = make_world(0, n_train=2, n_valid=1, n_test=1)["train"][0]
    msgs = teacher_trajectory(task)["messages"][:3]                     # system, issue, the view_file turn
    prompt, full = render_chat(msgs[:2], TOOLS, add_generation_prompt=True), render_chat(msgs, TOOLS)
    tok = train_tokenizer([full] * 50, vocab_size=600, min_frequency=2)
    model = build_model({"source": "config", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 2048,
                         "tie_word_embeddings": True, "dtype": "float32", "attn_implementation": "sdpa"}, tok)
    ids = torch.tensor(tok(full, add_special_tokens=False)["input_ids"])[None]
    labels = ids.clone(); labels[0, :len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100   # the assistant turn only
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for step in range(80):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad()
        if loss.item() < 0.01: break
    assert loss.item() < 0.05, loss.item()
    d = tmp_path_factory.mktemp("models")/"sft"
    model.config.use_cache = True
    model.save_pretrained(d); tok.save_pretrained(d)
    write_serving_files(d, "sft", folder=str(d))
    return d, task


def test_checkpoint_folder_alone_drives_the_agent(agent_dir):
    d, task = agent_dir
    card = (d/"README.md").read_text()
    snippet = re.search(r"## Drive it with plain transformers\n\n```python\n(.*?)```", card, re.S).group(1)
    assert f'path = "{d}"' in snippet
    code = snippet.replace('"<the issue>"', json.dumps(task.issue)) + textwrap.dedent('''
        import sys
        assert not any(m == "kat_nb" or m.startswith("kat_nb.") for m in sys.modules), "the client imported kat_nb"
        print("CALLS", json.dumps(calls))
        ''')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=d.parent, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = json.loads(out.stdout.split("CALLS", 1)[1])
    assert calls and calls[0]["name"] == "view_file", calls
    assert calls[0]["arguments"] == {"path": task.issue.split("Files in the repository: ")[1].split(",")[0]} or \
        isinstance(calls[0]["arguments"].get("path"), str), calls


def test_serving_files_are_what_the_agent_was_trained_with(agent_dir):
    from kat_nb.world import SYSTEM_PROMPT, TOOLS
    d, _ = agent_dir
    assert json.loads((d/"tools.json").read_text()) == TOOLS
    assert (d/"system_prompt.txt").read_text().strip() == SYSTEM_PROMPT
    cfg = json.loads((d/"config.json").read_text())
    assert f"vllm serve {d} --enable-auto-tool-choice --tool-call-parser hermes --max-model-len {cfg['max_position_embeddings']}" \
        in (d/"README.md").read_text()
    # the Hermes parser of `vllm serve` looks the markers up as single tokens of the vocabulary
    from transformers import AutoTokenizer
    vocab = AutoTokenizer.from_pretrained(d).get_vocab()
    assert "<tool_call>" in vocab and "</tool_call>" in vocab


def test_vllm_backend_without_vllm_fails_with_the_install_line(agent_dir):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError: pass
    from kat_nb.serve import BackendUnavailable, make_policy
    from kat_nb.eval import evaluate
    d, _ = agent_dir
    with pytest.raises(BackendUnavailable, match=r"policy.backend: vllm .*pip install -r requirements-gpu.lock"):
        make_policy(d, backend="vllm")
    with pytest.raises(BackendUnavailable, match="requirements-gpu"):   # the eval stage's own entry point, before any model loads
        evaluate(d.name, "world", d.parent, d.parent, policy={"backend": "vllm"})


def test_hf_backend_through_make_policy_acts_in_the_environment(agent_dir):
    "The one code path both backends share (prompt rendering, stop token, parsing), run here on the HF engine."
    from kat_nb.env import run_episodes
    from kat_nb.serve import make_policy
    d, task = agent_dir
    pol = make_policy(d, "hf", max_new_tokens=64, batch_size=4)
    rec = run_episodes([task], pol, max_turns=1)[0]
    first = rec["messages"][2]
    assert first["role"] == "assistant" and first["tool_calls"][0]["function"]["name"] == "view_file", first
