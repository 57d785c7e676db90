"Tree-structured trajectory training (kat_nb.tree): exactness against unpacked training, packing, errors, trainer seam."
import math, tempfile

import pytest
import torch

from kat_nb.tree import (ByteTokenizer, TreeCollator, _trace_tokenizer, bench_tree, branching_traces, build_trees, check_trees,
                         collate_tree_rows, compare_grads, node_entropy, pack_rows, prune_tree, random_branches,
                         split_trace, split_tree, step_groups, tiny_qwen3, tokenize_messages, tokenizer_fingerprint, tree_dataset,
                         flat_loss, tree_loss, tree_sft_args, tree_stats, tree_step_dataset, tree_trainer, trees_from_traces)

TOL = 1e-4


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_qwen3(attn_implementation=request.param, seed=1)


def _exact(model, seqs, **kw):
    r = compare_grads(model, seqs, **kw)
    assert r["loss_rel_err"] < TOL and r["max_grad_rel_err"] < TOL, r
    return r


@pytest.mark.parametrize("seed,n,prefix,depth,seg,masked", [
    (0, 4, 8, 2, 4, False), (1, 6, 1, 3, 3, True), (2, 3, 20, 1, 6, False),
    (3, 8, 4, 4, 2, True), (4, 5, 12, 2, 8, False), (5, 2, 0 + 1, 1, 1, False)])
def test_random_trees_exact(model, seed, n, prefix, depth, seg, masked):
    seqs = random_branches(seed, n_branches=n, prefix=prefix, depth=depth, seg=seg, masked=masked)
    _exact(model, seqs)
    _exact(model, seqs, normalize="token")


@pytest.mark.parametrize("name,seqs", [
    ("single branch", [[3, 4, 5, 6, 7]]),
    ("identical branches", [[3, 4, 5, 6, 7]] * 3),
    ("branch at the first token", [[3, 4, 5], [4, 4, 5], [5, 6]]),
    ("prefix of another", [[3, 4, 5], [3, 4, 5, 6, 7], [3, 4]]),
    ("deep chain", [list(range(1, 63))]),
    ("weighted and masked", [{"input_ids": [3, 4, 5, 6], "weight": 2.0, "loss_mask": [1, 1, 0, 1]},
                             {"input_ids": [3, 4, 7, 8], "loss_mask": [0, 0, 1, 1]}]),
])
def test_corner_cases_exact(model, name, seqs):
    _exact(model, seqs)


def test_split_trees_exact_across_rows(model):
    seqs = random_branches(7, n_branches=8, prefix=10, depth=3, seg=5)
    r = _exact(model, seqs, max_tokens=32)
    assert r["rows"] > 1


def test_step_groups():
    lengths = [5, 9, 3, 12, 7, 7, 1, 20]
    g = step_groups(lengths, 16, seed=3)
    assert sorted(i for x in g for i in x) == list(range(len(lengths)))            # a partition of the trajectories
    assert all(sum(lengths[i] for i in x) <= 16 or len(x) == 1 for x in g)        # a step's flat tokens stay in budget
    assert g == step_groups(lengths, 16, seed=3) and g != step_groups(lengths, 16, seed=4)
    assert step_groups(lengths, 16, seed=None)[0] == [0, 1]                          # no shuffle: in order


@pytest.mark.parametrize("share_root,max_tokens", [(False, 64), (True, 64), (True, 12)])
def test_step_items_equal_flat_steps(model, share_root, max_tokens):
    """One dataset item = one optimizer step whose tree loss and gradients are the flat loss of the same trajectories
    (a forest of the whole dataset would put the shared prefix, with every branch's weight, into one mini-batch).
    With `share_root` the prefix every branch shares runs once and its keys are reused by every row."""
    seqs = random_branches(11, n_branches=12, prefix=16, depth=2, seg=6, masked=True)
    seqs += [{"input_ids": [5, 6, 7, 8], "loss_mask": [1, 1, 1, 1]}]                 # a second tree in some step
    lengths = [len(s["input_ids"]) for s in seqs]
    ds = tree_step_dataset(seqs, step_tokens=3 * max(lengths), max_tokens=max_tokens, seed=0, share_root=share_root)
    assert all(bool(it["root_ids"]) == share_root for it in ds)
    groups = step_groups(lengths, 3 * max(lengths), 0)
    assert len(ds) == len(groups) > 2
    for item, g in zip(ds, groups):
        model.zero_grad(); lt, _ = tree_loss(model, TreeCollator(normalize="token")([item])); lt.backward()
        gt = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(); lf = flat_loss(model, [seqs[i] for i in g], normalize="token"); lf.backward()
        assert abs(float(lt.detach()) - float(lf.detach())) / float(lf.detach()) < TOL
        assert max(float((a - p.grad).norm() / p.grad.norm().clamp_min(1e-12)) for a, p in zip(gt, model.parameters())) < TOL
    # the shared prefix is computed once per step: fewer tree tokens than flat ones in every step
    assert all(sum(map(len, item["input_ids"])) + len(item["root_ids"]) < sum(item["tokens_flat"]) for item in ds)


@pytest.mark.parametrize("seqs", [[[3, 4, 5, 6]] * 3,                                   # identical: everything is the prefix
                                  [[3, 4, 5, 6], [3, 4, 5, 6, 7, 8]],                    # one branch is the other's prefix
                                  [[3, 4, 5], [9, 8, 7, 6], [3, 4, 2]],                  # a second tree beside the shared one
                                  [[3] + list(range(20, 32)) + [40 + i, 41] for i in range(4)]    # two prompt families sharing
                                  + [[3, 4, 5 + i, 6] for i in range(3)]])                         # only their first token
def test_shared_prefix_corner_cases(model, seqs):
    seqs = [{"input_ids": s} for s in seqs]
    item = tree_step_dataset(seqs, step_tokens=10**6, max_tokens=8, seed=None, share_root=True)[0]
    assert item["root_ids"]
    if len(seqs) == 7:   # the long prefix of the bigger family is shared, not the one token every trajectory starts with
        assert item["root_ids"] == [3] + list(range(20, 32))
    model.zero_grad(); lt, _ = tree_loss(model, TreeCollator(normalize="token")([item])); lt.backward()
    gt = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(); lf = flat_loss(model, seqs, normalize="token"); lf.backward()
    assert abs(float(lt.detach()) - float(lf.detach())) / float(lf.detach()) < TOL
    assert max(float((a - p.grad).norm() / p.grad.norm().clamp_min(1e-12)) for a, p in zip(gt, model.parameters())) < TOL


def test_sdpa_runs_equal_the_dense_mask():
    """An sdpa model takes a tree batch's attention by runs on one unpadded row (`kat_nb.tree_runs`); sdpa without
    `row_len` takes the dense LxL mask. Both must give the same loss and gradients: rows with several trees, padding,
    a shared prefix."""
    from kat_nb.tree_runs import chain_runs, run_layout
    model = tiny_qwen3(attn_implementation="sdpa", seed=2)
    seqs = [{"input_ids": s} for s in [[3] + list(range(20, 32)) + [40 + i, 41] for i in range(4)] + [[3, 4, 5 + i, 6] for i in range(3)] + [[9, 8, 7, 6, 5], [9, 8, 2]]]
    for share_root, max_tokens in [(True, 8), (False, 40)]:
        item = tree_step_dataset(seqs, step_tokens=10**6, max_tokens=max_tokens, seed=None, share_root=share_root)[0]
        batch = TreeCollator(normalize="token")([item])
        lay = run_layout(batch, len(item["root_ids"]))
        assert sum(not anc for _, _, anc, _, _ in lay.runs) > len(batch["row_len"])     # some row holds several trees
        assert lay.input_ids.shape[1] == int(batch["row_len"].sum())                     # no padding
        grads = []
        for b in (batch, {k: v for k, v in batch.items() if k != "row_len"}):
            model.zero_grad(); loss, _ = tree_loss(model, b); loss.backward()
            grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
        assert model.config._attn_implementation == "sdpa"             # the runs implementation is switched back
        (l1, g1), (l0, g0) = grads
        assert abs(l1 - l0) / l0 < 1e-5 and max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(g1, g0)) < 1e-5
    with pytest.raises(ValueError, match="token 0: subtree end 9 outside"):
        chain_runs([9, 2, 3])


def test_real_traces_exact_with_masks(model):
    g = branching_traces(1, source="synthetic", tools=False)[0]
    bt = ByteTokenizer()
    big = tiny_qwen3(vocab_size=256, attn_implementation=model.config._attn_implementation)
    seqs = [tokenize_messages(s["messages"], bt, s["context"]) for r in g["routes"].values() for s in split_trace(r)]
    _exact(big, seqs, max_tokens=2048)


def test_pack_invariants():
    seqs = random_branches(11, n_branches=7, prefix=9, depth=2, seg=5, masked=True)
    trees = build_trees(seqs)
    d = max(t.max_depth for t in trees)
    for budget in (d, d + 7, 10**6):
        rows = pack_rows(trees, budget)
        assert all(len(r["input_ids"]) <= budget for r in rows)
        w = sum(sum(r["pair_w_tok"]) for r in rows)
        assert math.isclose(w, sum(sum(s["loss_mask"][1:]) for s in seqs))        # every loss term once
        assert math.isclose(sum(sum(r["pair_w_seq"]) for r in rows), sum(1 for s in seqs if sum(s["loss_mask"][1:])))
        assert tree_stats(rows)["tokens_flat"] == sum(len(s["input_ids"]) for s in seqs)
        for r in rows:                                     # every token attends within its own span
            assert all(i < e <= len(r["input_ids"]) for i, e in enumerate(r["subtree_end"]))


def test_errors():
    with pytest.raises(ValueError, match="trajectory 1 is empty"): build_trees([[1, 2], []])
    with pytest.raises(ValueError, match="no trajectories"): build_trees([])
    deep = build_trees([list(range(1, 40))])[0]
    with pytest.raises(ValueError, match="root-to-leaf path of the tree has 39 tokens"): split_tree(deep, 16)
    with pytest.raises(ValueError, match="root-to-leaf"): pack_rows([deep], 16)
    tr = build_trees([[1, 200]], tokenizer="a:1")
    with pytest.raises(ValueError, match="outside the model's vocabulary"): check_trees(tr, tiny_qwen3(vocab_size=64))
    with pytest.raises(ValueError, match="re-tokenize"): check_trees(tr, tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="normalize"): collate_tree_rows(pack_rows(tr, 8), normalize="mean")


def test_stats_and_traces():
    groups = branching_traces(2, source="auto")
    trees = trees_from_traces(groups, ByteTokenizer())
    st = tree_stats(trees)
    assert st["tokens_flat"] > st["tokens_tree"] and st["ideal_ratio"] > 1.5
    assert {t.tokenizer for t in trees} == {tokenizer_fingerprint(ByteTokenizer())}
    kinds = set(k for t in trees for k in t.kind)
    assert {"system", "user", "assistant", "tool_call", "tool", "memory"} <= kinds


def test_prune_keeps_tool_nodes():
    bt = ByteTokenizer()
    g = branching_traces(1, source="synthetic", tools=False)[0]
    tree = trees_from_traces([g], bt)[0]
    ent = node_entropy(tiny_qwen3(vocab_size=256), tree, max_tokens=4096)
    assert len(ent) == len(tree.tokens) and all(e >= 0 for e in ent)
    # every route ends in a tool result, so the literal rule (always=True: tool nodes + ancestors) keeps the whole tree
    forced = {a for i, k in enumerate(tree.kind) if k in ("tool_call", "tool", "memory") for a in tree.ancestors(i) + [i]}
    assert len(forced) == len(tree.tokens)
    with pytest.raises(ValueError, match="always kept"): prune_tree(tree, tree.n_tokens - 1, ent, always=True)
    budget = tree.n_tokens // 2
    small, info = prune_tree(tree, budget, ent)                     # default: whole branches go, pairs stay intact
    assert small.n_tokens <= budget and info["dropped"] > 0
    assert all(p < i for i, p in enumerate(small.parent))          # ancestor-closed, parents first
    kids = small.children
    for i, k in enumerate(small.kind):                              # no kept call without its result
        if k == "tool_call" and any(tree.kind[c] == "tool" for c in tree.children[_orig(tree, small, i)]):
            assert any(small.kind[c] == "tool" for c in kids[i]), i
    # keep_kinds + always: the named kind (and its ancestors) survives a budget the scores alone spend elsewhere
    n_mem, tight = tree.kind.count("memory"), tree.n_tokens // 3
    plain, _ = prune_tree(tree, tight, ent)
    assert n_mem and "memory" not in plain.kind                     # pruned without keep_kinds, so the next lines test it
    small2, info2 = prune_tree(tree, tight, ent, keep_kinds=("memory",), always=True)
    assert small2.n_tokens <= tight and small2.kind.count("memory") == n_mem and "memory" in info2["kept_kinds"], info2


def _orig(tree, small, i):
    "The node of `tree` that node `i` of the pruned `small` copies (same tokens at the same start)."
    return next(j for j in range(len(tree.tokens)) if tree.start[j] == small.start[i] and tree.tokens[j] == small.tokens[i])


def test_sft_trainer_seam():
    from trl import SFTTrainer
    from transformers.trainer_callback import PrinterCallback
    groups = branching_traces(1, source="synthetic", tools=False)
    tok = _trace_tokenizer(groups, 400)
    trees = trees_from_traces(groups, tok)
    model = tiny_qwen3(vocab_size=len(tok))
    check_trees(trees, model, tok)
    ds = tree_dataset(trees, 1024)
    tr = tree_trainer(SFTTrainer)(model=model, args=tree_sft_args(tempfile.mkdtemp(), max_steps=2), train_dataset=ds,
                                  eval_dataset=ds, data_collator=TreeCollator(tok.pad_token_id), processing_class=tok)
    tr.remove_callback(PrinterCallback)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs and logs[0]["tree_ideal_ratio"] > 1
    assert math.isfinite(tr.evaluate()["eval_loss"])


def test_bench_smoke():
    rows = bench_tree(quick=True, n_groups=1, max_tokens=2048)
    s = rows[-1]
    for k in ("ideal_ratio", "speedup", "max_grad_rel_err", "tokens_flat", "tokens_tree", "peak_mem_mb_flat",
              "peak_mem_mb_tree", "efficiency"):
        assert k in s
    assert s["max_grad_rel_err"] < TOL and s["tokens_flat"] > s["tokens_tree"]
