"""Agentic RL's update (kat_nb.rl): the GRPO objective on trie-packed rollouts equals the unpacked one (loss and every
gradient, advantages of both signs, clipped and unclipped tokens, a KL term, branches of different lengths, trees split
across rows), the shared-token weights, advantage reshaping, and `kat-nb bench rl` through the installed module."""
import copy, random
import pytest
import torch

from kat_nb.reward import grpo_advantages
from kat_nb.rl import (bench_rl, flat_logp, grad_errors, grpo_batch, grpo_flat_loss, grpo_loss, pair_logp, reshape_advantages,
                       rollout_entropy)
from kat_nb.tree import random_branches, tiny_qwen3


def perturbed(model, scale, seed):
    m = copy.deepcopy(model); g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return m


@pytest.mark.parametrize("seed,max_tokens,normalize", [(5, 4096, "sequence"), (6, 48, "token"), (7, 64, "sequence")])
def test_packed_grpo_equals_unpacked(seed, max_tokens, normalize):
    model = tiny_qwen3(initializer_range=0.2, seed=seed)
    seqs = random_branches(seed=seed, n_branches=10, prefix=12, depth=3, seg=5, masked=True)
    adv = [random.Random(seed * 100 + b).uniform(-2, 2) for b in range(len(seqs))]
    assert min(adv) < 0 < max(adv)
    old, ref = perturbed(model, 0.06, seed), perturbed(model, 0.03, seed + 1)
    gb = grpo_batch(seqs, adv, max_tokens=max_tokens, normalize=normalize)
    assert gb.tokens_tree < gb.tokens_flat
    with torch.no_grad(): old_p, ref_p = pair_logp(old, gb), pair_logp(ref, gb); old_f, ref_f = flat_logp(old, seqs), flat_logp(ref, seqs)
    _, st = grpo_loss(model, gb, old_p, ref_p, kl_coef=0.05)
    assert 0.02 < st["clip_fraction"] < 0.98 and st["kl"] > 0
    e = grad_errors(model, lambda: grpo_loss(model, gb, old_p, ref_p, kl_coef=0.05)[0],
                    lambda: grpo_flat_loss(model, seqs, adv, old_f, ref_f, kl_coef=0.05, normalize=normalize))
    assert e["loss_rel_err"] < 1e-4 and e["max_grad_rel_err"] < 1e-4, e


def test_one_weight_per_token_is_not_enough():
    "Folding W+ and W- into one weight (the SFT engine's single channel) breaks the clipped objective: the test can fail."
    model = tiny_qwen3(initializer_range=0.2)
    seqs = random_branches(seed=3, n_branches=8, prefix=10, depth=2, seg=6, masked=True)
    adv = [random.Random(b).uniform(-1.5, 1.5) for b in range(len(seqs))]
    old = perturbed(model, 0.06, 1)
    gb = grpo_batch(seqs, adv)
    with torch.no_grad(): old_p, old_f = pair_logp(old, gb), flat_logp(old, seqs)
    gb.w_pos, gb.w_neg = gb.w_pos + gb.w_neg, torch.zeros_like(gb.w_neg)
    e = grad_errors(model, lambda: grpo_loss(model, gb, old_p)[0], lambda: grpo_flat_loss(model, seqs, adv, old_f))
    assert e["max_grad_rel_err"] > 1e-2


def test_shared_tokens_and_errors():
    seqs = [{**s, "loss_mask": [1] * len(s["input_ids"])} for s in random_branches(seed=3, n_branches=8, prefix=10, depth=2, seg=6)]
    gb = grpo_batch(seqs, grpo_advantages([1, 0, 0, 1, 1, 0, 1, 0], 8), normalize="token")
    shared = set.intersection(*map(set, gb.branch_pairs))
    assert len(shared) >= 9
    for j in shared: assert float(gb.w_pos[j]) > 0 and abs(float(gb.w_pos[j] + gb.w_neg[j])) < 1e-7
    flat = grpo_batch(seqs, [0.5] * 8, share=False)
    assert flat.tokens_tree == flat.tokens_flat == sum(len(s["input_ids"]) for s in seqs)
    with pytest.raises(ValueError, match="8 rollouts but 2 advantages"): grpo_batch(seqs, [1.0, 2.0])
    with pytest.raises(ValueError, match="normalize must be"): grpo_batch(seqs, [1.0] * 8, normalize="mean")
    with pytest.raises(ValueError, match="needs ref_logp"): grpo_loss(tiny_qwen3(), gb, kl_coef=0.1)


def test_reshape_advantages():
    A = grpo_advantages([1, 0, 0, 0, 1, 1, 1, 0], 4)
    passed = [1, 0, 0, 0, 1, 1, 1, 0]; H = [0.5, 0.7, 0.9, 0.5, 0.2, 0.2, 0.2, 1.0]
    assert reshape_advantages(A, passed, H, 4)[0] == A                      # lambda = mu = 0: plain GRPO
    A2, alpha, beta = reshape_advantages(A, passed, H, 4, lam=1.0, mu=1.0)
    assert alpha == pytest.approx([1.25] * 4 + [0.75] * 4)                  # D = 0.75, 0.25 around a mean of 0.5
    assert beta[:4] == pytest.approx([0.85, 1.05, 1.25, 0.85]) and beta[7] == 1.5   # 1.6 clipped
    assert A2 == pytest.approx([a * x * y for a, x, y in zip(A, alpha, beta)])
    with pytest.raises(ValueError, match="multiple of group_size"): reshape_advantages(A, passed, H, 3)
    with pytest.raises(ValueError, match="clip range"): reshape_advantages(A, passed, H, 4, lo=1.2)


def test_rollout_entropy_is_the_unpacked_mean():
    model = tiny_qwen3(initializer_range=0.2)
    seqs = random_branches(seed=4, n_branches=6, masked=True)
    gb = grpo_batch(seqs, [0.0] * 6)
    with torch.no_grad():
        _, ent = pair_logp(model, gb, entropy=True)
        for s, h in zip(seqs, rollout_entropy(gb, ent)):
            lp = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].float().log_softmax(-1)
            m = torch.tensor(s["loss_mask"][1:], dtype=torch.float32)
            assert h == pytest.approx(float((-(lp.exp() * lp).sum(-1) * m).sum() / m.sum()), rel=1e-4)


def test_bench_rl_quick():
    rows = bench_rl(quick=True, group_sizes=(4,))
    assert [(r["group_size"], r["branching"]) for r in rows] == [(4, False), (4, True)]
    for r in rows:
        assert r["max_grad_rel_err"] < 1e-4 and r["loss_rel_err"] < 1e-4 and r["step_s_tree"] > 0 and r["peak_mem_mb_tree"] >= 0
    assert rows[1]["ideal_ratio"] > rows[0]["ideal_ratio"] > 1


def test_branching_rollouts_fork_workspaces():
    "Forked episodes go on in their own workspaces: the scripted teacher's edits after the fork land once in each."
    from kat_nb.env import TeacherPolicy, run_episodes
    from kat_nb.world import make_world
    tasks = make_world(0, 3, 1, 1)["train"][:2]
    plain = run_episodes([t for t in tasks for _ in range(4)], TeacherPolicy(), keep_files=True)
    tree = run_episodes([t for t in tasks for _ in range(4)], TeacherPolicy(), keep_files=True, branch=(2, 1))
    assert [r["resolved"] for r in tree] == [r["resolved"] for r in plain] == [True] * 8
    assert [r["messages"] for r in tree] == [r["messages"] for r in plain] and [r["files"] for r in tree] == [r["files"] for r in plain]
    with pytest.raises(ValueError, match="runs of 2 consecutive listings"): run_episodes([tasks[0], tasks[1]], TeacherPolicy(), branch=(2, 1))


def test_branching_copies_the_kv_cache():
    "Greedy forks continue from a copy of their parent's cache rows: every token stream equals the unbranched run's."
    from kat_nb.env import HFPolicy, run_episodes
    from kat_nb.model import build_model, row_text, train_tokenizer
    from kat_nb.world import make_world, teacher_trajectory
    w = make_world(0, 4, 1, 1); tasks = w["train"][:2]
    tok = train_tokenizer([row_text(teacher_trajectory(t)) for t in w["train"]] * 4, vocab_size=600)
    torch.manual_seed(0)
    model = build_model({"source": "config", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 32, "intermediate_size": 128}, tok)
    def go(branch):
        pol = HFPolicy(model, tok, max_new_tokens=12, batch_size=16, cross_turn_cache=True)
        return run_episodes([t for t in tasks for _ in range(4)], pol, max_turns=3, max_format_errors=None, branch=branch)
    plain, tree = go(None), go((2, 2))
    assert all(r["turns"] == 3 for r in plain + tree)
    assert [r["tokens"] for r in tree] == [r["tokens"] for r in plain] and [r["token_mask"] for r in tree] == [r["token_mask"] for r in plain]


# --- the stage: kill -9, then dvc repro resumes ------------------------------------------------------------------

@pytest.mark.xdist_group("pipeline")
def test_killed_rl_resumes_from_its_last_checkpoint(sft_repo, tmp_path):
    import yaml
    from test_pipeline import kill_then_resume
    repo = sft_repo                                           # smoke profile, rl.steps 8, a checkpoint every step
    p = yaml.safe_load((repo/"params.yaml").read_text()); p["rl"]["input"] = "sft"   # the fixture stops at SFT
    (repo/"params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    saved, m = kill_then_resume("rl", repo, tmp_path/"killed.log", steps=8)
    assert m["steps"] == 8 and m["resumed_from"], m
    steps = [int(float(r.split("\t")[0])) for r in (repo/"dvclive"/"rl"/"plots"/"metrics"/"rl"/"entropy.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9)), steps                 # one row per step: the killed run's tail was trimmed


def test_reweight_equals_a_fresh_batch():
    "Reshaped advantages laid on an already packed batch give the weights a batch packed with them would have."
    seqs = random_branches(seed=4, n_branches=8, prefix=10, depth=2, seg=6, masked=True)
    a1 = [random.Random(b).uniform(-1, 1) for b in range(8)]; a2 = [x * (1 + 0.1 * b) for b, x in enumerate(a1)]
    for norm in ("sequence", "token"):
        gb, ref = grpo_batch(seqs, a1, normalize=norm).reweight(seqs, a2, norm), grpo_batch(seqs, a2, normalize=norm)
        for k in ("w_pos", "w_neg", "w_all"): assert torch.allclose(getattr(gb, k), getattr(ref, k)), (norm, k)
