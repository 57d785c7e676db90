"SFT data balancing and training: label coverage, marginals, determinism, repeat cap, assistant-only mask, resume."
import random
import numpy as np
import pytest
from kat_nb.mixture import GRID, balance, coverage, encode_labels, sft_mixture, load_sft_rows
from kat_nb.world import AXES, ARCHETYPES, DEV_CONTEXTS, LANGUAGES, grid_rows, skewed_weights, text_task, exec_task


def test_grid_labels_cover_the_whole_grid():
    rows = grid_rows(3000, seed=0, executable=False)           # uniform draw: every language, context, archetype appears
    for a, cats in GRID.items(): assert {r[a] for r in rows} == set(cats), a
    for l in LANGUAGES:
        for arch in ARCHETYPES:
            m = text_task(l, DEV_CONTEXTS[0], arch, random.Random(0))
            assert m[-1]["role"] == "assistant" and m[-1]["content"].strip()


def test_exec_tasks_pass_their_tests():
    for arch in ("feature implementation", "test case generation", "configuration and deployment"):
        r = exec_task(arch, random.Random(1))
        assert r is not None and r["messages"][-1]["content"] == "Submitted.", arch


def _skewed(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(24, n, p=np.r_[0.5, np.full(23, 0.5 / 23)]), rng.choice(10, n, p=np.r_[0.4, np.full(9, 0.6 / 9)]),
                     rng.choice(10, n, p=np.r_[0.6, np.full(9, 0.4 / 9)])], 1)


def test_marginals_match_uniform_targets():
    codes = _skewed()
    idx, rep = balance(codes, (24, 10, 10), 8000, max_repeat=4, seed=0)
    assert len(idx) == 8000 and rep["max_marginal_error"] < 0.005
    for j, k in enumerate((24, 10, 10)):
        np.testing.assert_allclose(np.bincount(codes[idx, j], minlength=k) / 8000, 1 / k, atol=0.005)
    before, after = coverage(codes, (24, 10, 10)), coverage(codes[idx], (24, 10, 10))
    assert after["language"]["entropy_bits"] > before["language"]["entropy_bits"]


def test_given_targets_and_missing_categories():
    codes = _skewed()
    t = [np.r_[3.0, np.ones(23)], None, None]
    idx, _ = balance(codes, (24, 10, 10), 5000, t, max_repeat=4, seed=0)
    assert abs(np.mean(codes[idx, 0] == 0) - 3 / 26) < 0.005
    few = codes[codes[:, 0] != 5]                                   # language 5 absent: its share goes to the others
    idx, rep = balance(few, (24, 10, 10), 5000, seed=0)
    assert rep["missing"] == {0: [5]} and abs(np.mean(few[idx, 0] == 0) - 1 / 23) < 0.005



def test_named_targets_with_a_shared_rest():
    pool = grid_rows(4000, 1, skewed_weights, executable=False)          # mostly Python and bug fixing: enough rows for the targets
    mix, rep = sft_mixture(pool, 2000, {"language": {"Python": 0.5, "*": 0.5}, "archetype": {"debugging and bug fixing": 0.4, "*": 0.6}},
                           max_repeat=4, seed=0)
    share = lambda a, c: sum(r[a] == c for r in mix) / len(mix)
    assert abs(share("language", "Python") - 0.5) < 0.01 and abs(share("language", "Rust") - 0.5 / 23) < 0.01
    assert abs(share("archetype", "debugging and bug fixing") - 0.4) < 0.02 and rep["max_marginal_error"] < 0.02
    with pytest.raises(ValueError, match="targets.language: unknown categories"): sft_mixture(pool, 10, {"language": {"Pyhton": 1.0}})


def test_determinism_and_repeat_cap():
    codes = _skewed(3000)
    a, _ = balance(codes, (24, 10, 10), 6000, max_repeat=3, seed=7)
    b, _ = balance(codes, (24, 10, 10), 6000, max_repeat=3, seed=7)
    c, _ = balance(codes, (24, 10, 10), 6000, max_repeat=3, seed=8)
    assert (a == b).all() and not (a == c).all()
    assert np.bincount(a).max() <= 3
    small, _ = balance(codes[:100], (24, 10, 10), 10_000, max_repeat=2)
    assert len(small) == 200 and np.bincount(small).max() == 2       # the cap bounds the mixture size


def test_labelled_hf_rows_and_mixture():
    rows = load_sft_rows({"path": "data/fixtures/sft_labelled.jsonl"})
    assert [r["language"] for r in rows] == ["Rust", "SQL", "Shell"]
    mix, rep = sft_mixture(rows + grid_rows(200, 0, skewed_weights, executable=False), 150, seed=0)
    assert len(mix) == 150 and set(AXES) <= set(mix[0])


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    from kat_nb.model import build_model, render_chat, train_tokenizer
    from kat_nb.world import make_world, teacher_trajectory
    w = make_world(0, 6, 1, 1)
    rows = [teacher_trajectory(t) for t in w["train"]] + grid_rows(12, 0, executable=False)
    tok = train_tokenizer([render_chat(r["messages"], r.get("tools") or None) for r in rows] * 2, vocab_size=500)
    cfg = dict(source="config", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               intermediate_size=64, max_position_embeddings=4096, attn_implementation="sdpa")
    d = tmp_path_factory.mktemp("sft")
    build_model(cfg, tok).save_pretrained(d/"init"); tok.save_pretrained(d/"init")
    return rows, tok, d


def test_assistant_only_mask(tiny_sft):
    from kat_nb.sft import sft_dataset
    from kat_nb.train import PackedCollator
    rows, tok, _ = tiny_sft
    ds = sft_dataset(rows, tok, 4096)
    b = PackedCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    ids, lab = b["input_ids"], b["labels"]
    trained = set(ids[lab != -100].tolist())
    for special in ("<tool_response>", "</tool_response>", "<|im_start|>"):
        assert tok.convert_tokens_to_ids(special) not in trained, special   # observations and turn headers: no loss
    user = rows[0]["messages"][1]["content"]
    text = tok.decode(ids[0][lab[0] != -100].tolist())
    assert user not in text and "Plan:" in text and "<tool_call>" in text


def test_error_masked_turns_carry_no_loss(tiny_sft):
    from kat_nb.sft import sft_tokenize
    from kat_nb.world import error_masked, make_world, teacher_trajectory
    _, tok, _ = tiny_sft
    task = make_world(0, 6, 1, 1)["train"][0]
    rec = teacher_trajectory(task, mistake=True)
    (x, y), (_, y_raw) = [(a, b) for a, b in zip(*sft_tokenize([error_masked(rec), rec], tok).values())]
    trained, raw = tok.decode([t for t in y if t != -100]), tok.decode([t for t in y_raw if t != -100])
    wrong, fix = rec["messages"][6]["content"], rec["messages"][8]["content"]
    assert wrong in raw and wrong not in trained and fix in trained and len(trained) < len(raw)
    assert sum(t != -100 for t in y) == sum(t != -100 for t in sft_tokenize([teacher_trajectory(task)], tok)["labels"][0])
    with pytest.raises(ValueError, match="no assistant tokens"):
        sft_tokenize([{**rec, "messages": [{**m, "loss": False} if m["role"] == "assistant" else m for m in rec["messages"]]}], tok)


def test_turn_weights(tiny_sft):
    from kat_nb.sft import run_sft, sft_tokenize, sft_tree_seqs, weight_turns
    from kat_nb.world import make_world, teacher_trajectory
    rows, tok, d = tiny_sft
    rec = teacher_trajectory(make_world(0, 6, 1, 1)["train"][0])
    w = weight_turns(rec, {"edit": 4.0})
    assert [m.get("loss_weight") for m in w["messages"] if m["role"] == "assistant"] == [None, None, 4.0, None, None]
    assert "loss_weight" not in str(rec) and weight_turns(rec, None) is rec
    enc = sft_tokenize([w], tok, weights=True)
    x, ws = enc["input_ids"][0], enc["weights"][0]
    edit_text = tok.decode([t for t, v in zip(x, ws) if v == 4.0])
    assert rec["messages"][6]["content"] in edit_text and "run_tests" not in edit_text and set(ws) == {0.0, 1.0, 4.0}
    assert [int(v > 0) for v in ws] == [int(v > 0) for v in sft_tokenize([rec], tok, weights=True)["weights"][0]]
    seqs = sft_tree_seqs([w], tok, 4096)
    assert seqs[0]["loss_mask"] == [int(v) if v in (0.0, 1.0) else v for v in ws]
    with pytest.raises(ValueError, match="tree_packing"): sft_tokenize([w], tok)       # the flat path has no per-token weights
    with pytest.raises(ValueError, match="loss_weight must be a number"):
        sft_tokenize([{**rec, "messages": [{**m, "loss_weight": "x"} for m in rec["messages"]]}], tok)
    p = dict(max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, global_batch_size=2,
             per_device_batch_size=2, seq_len=1024, packing=True, tree_packing=False, turn_weights={"edit": 4.0}, eval_steps=1,
             save_steps=1, logging_steps=1, save_total_limit=1, eval_samples=2, deepspeed=None, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="sft.turn_weights .* needs tree_packing"):
        run_sft(rows, rows[:2], d/"init", p, d/"weighted", None, echo=None)


def test_resume(tiny_sft):
    from kat_nb.sft import run_sft
    rows, tok, d = tiny_sft
    P = dict(max_steps=4, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, global_batch_size=2,
             per_device_batch_size=2, seq_len=4096, packing=True, eval_steps=2, save_steps=2, logging_steps=2, save_total_limit=3,
             eval_samples=2, deepspeed=None, use_cpu=True, bf16=False)
    m1 = run_sft(rows, rows[:2], d/"init", {**P, "max_steps": 2}, d/"out", d/"live", echo=None)
    m2 = run_sft(rows, rows[:2], d/"init", P, d/"out", d/"live", echo=None)
    assert m1["train_steps"] == 2 and m2["train_steps"] == 4 and m2["resumed_from"].endswith("checkpoint-2")
    assert m2["val_loss_start"] == pytest.approx(m1["val_loss_start"])


def test_tree_packing_steps(tiny_sft):
    """`tree_packing: true`: one dataset item per optimizer step (the step's trajectories merged into trees), the loss is
    the assistant-only loss (observations and user turns carry no weight), the shared prefix is computed once."""
    from kat_nb.sft import run_sft, sft_tree_seqs
    from kat_nb.tree import tree_step_data
    rows, tok, d = tiny_sft
    P = dict(max_steps=2, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, global_batch_size=1,
             per_device_batch_size=1, seq_len=4096, packing=True, tree_packing=True, tree_normalize="token", tree_row_tokens=4096,
             eval_steps=2, save_steps=2, logging_steps=1, save_total_limit=1, eval_samples=2, deepspeed=None, use_cpu=True, bf16=False)
    seqs = sft_tree_seqs(rows, tok, 4096)
    enc = [tok.apply_chat_template(r["messages"], tools=r.get("tools") or None, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True) for r in rows]
    assert [s["loss_mask"] for s in seqs] == [list(e["assistant_masks"]) for e in enc]
    train, valid = tree_step_data(seqs, seqs, P)
    per_step = [sum(item["tokens_flat"]) for item in train]
    assert len(train) == len(per_step) >= 2 and sum(per_step) == sum(len(s["input_ids"]) for s in seqs)
    assert all(sum(map(len, it["input_ids"])) < sum(it["tokens_flat"]) for it in train)     # shared prompt once per step
    m = run_sft(rows, rows[:4], d/"init", P, d/"out_tree", d/"live_tree", echo=None)
    assert m["train_steps"] == 2 and m["val_loss_end"] < m["val_loss_start"]
    assert m["loss_tokens_per_epoch"] == sum(sum(s["loss_mask"][1:]) for s in seqs)
