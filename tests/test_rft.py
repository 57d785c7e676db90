"""RFT (kat_nb.reward, kat_nb.rft): each reward component and aggregator, malformed rollouts, GRPO advantages on a
hand-computed group, early termination and correction of drifting rollouts, the loss masks of spliced turns, and a
killed `dvc repro rft` that resumes from its last checkpoint."""
import json, math
import pytest

from kat_nb.env import Episode, TeacherPolicy, assistant_text, run_episodes
from kat_nb.model import train_tokenizer, row_text
from kat_nb import reward as R              # (not `from ... import tests_reward`: pytest would collect it as a test)
from kat_nb.reward import aggregate, format_reward, grpo_advantages, reference_reward, score_rollouts
from kat_nb.rft import DriftMonitor, build_references, drift, episode_tokens
from kat_nb.teacher import teacher_trajectory
from kat_nb.tools import TOOLS
from kat_nb.world import make_world


@pytest.fixture(scope="module")
def world():
    w = make_world(3, n_train=4, n_valid=1, n_test=1)
    return w, build_references(w["train"], "multi")


@pytest.fixture(scope="module")
def tok(world):
    w, _ = world
    return train_tokenizer([row_text(teacher_trajectory(t)) for t in w["train"]] * 8, vocab_size=600)


def call(name, **args):
    return assistant_text({"role": "assistant", "content": "Plan: go.", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]})


class Script:
    "Plays the same list of turn texts in every episode (a scripted policy)."
    name = "script"
    def __init__(self, texts): self.texts = texts
    def act(self, eps): return [self.texts[min(e.turns, len(self.texts) - 1)] for e in eps]


# --- rewards ------------------------------------------------------------------------------------------------------

def test_each_reward_component(world):
    w, refs = world
    t = w["train"][0]
    good = teacher_trajectory(t)
    fixed, buggy = t.solutions[0], t.files
    assert R.tests_reward(None, [None, None], task=[t, t], files=[fixed, buggy]) == [1.0, 0.0]
    assert R.tests_reward(None, [None], task=[t], files=[buggy], resolved=[True]) == [1.0]       # the environment's verdict wins
    assert format_reward(None, [good["messages"]]) == [1.0]
    half = good["messages"][:2] + [{"role": "assistant", "content": "no call"}, good["messages"][2]]
    assert format_reward(None, [half]) == [0.5]
    # the nearest reference: the rollout is one of them, so max = 1; mean is lower when the others differ
    near = reference_reward(None, [good["messages"]], task=[t], files=[fixed], references=[refs[t.id]], aggregate="max")[0]
    mean = reference_reward(None, [good["messages"]], task=[t], files=[fixed], references=[refs[t.id]], aggregate="mean")[0]
    assert near == pytest.approx(1.0) and mean < near
    assert reference_reward(None, [good["messages"]], task=[t], files=[buggy], references=[refs[t.id]])[0] < near


def test_aggregators_by_hand():
    assert aggregate([0.2, 0.8, 0.5], "max") == 0.8
    assert aggregate([0.2, 0.8, 0.5], "mean") == pytest.approx(0.5)
    w = [math.exp((s - 0.8) / 0.1) for s in (0.2, 0.8, 0.5)]
    assert aggregate([0.2, 0.8, 0.5], "softmax", tau=0.1) == pytest.approx(sum(a * b for a, b in zip(w, (0.2, 0.8, 0.5))) / sum(w))
    assert aggregate([0.2, 0.8], "softmax", tau=1e-3) == pytest.approx(0.8)       # a cold softmax is the max
    with pytest.raises(ValueError, match="max, mean or softmax"): aggregate([0.1], "median")
    with pytest.raises(ValueError, match="no references"): aggregate([], "max")


def test_malformed_rollouts_score_with_reasons_and_never_crash(world):
    w, refs = world
    t = w["train"][1]
    sys_user = teacher_trajectory(t)["messages"][:2]
    rollouts = {
        "no tool call": sys_user + [{"role": "assistant", "content": "I think it is fine."}],
        "unparsable": sys_user + [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": None, "arguments": None}, "error": "bad JSON"}]}],
        "no turns": sys_user,
        "garbage": "not even a list",
    }
    rows = score_rollouts([t] * 4, list(rollouts.values()), [t.files, t.files, None, {"x.py": 1}], [refs[t.id]] * 4)
    for (name, _), r in zip(rollouts.items(), rows):
        assert r["tests"] == 0.0 and r["format"] == 0.0 and "tests" in r["reasons"] and "format" in r["reasons"], (name, r)
        assert math.isfinite(r["reward"]), (name, r)


def test_grpo_advantages_on_a_hand_computed_group():
    # rewards 1, 0, 0, 1: mean 0.5, sample standard deviation sqrt(4 * 0.25 / 3) = 0.57735
    adv = grpo_advantages([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3], 4)
    assert adv[:4] == pytest.approx([0.8659, -0.8659, -0.8659, 0.8659], abs=1e-3)
    assert adv[4:] == [0.0] * 4                                                   # equal rewards: no signal
    assert grpo_advantages([1.0, 0.0], 2, scale=False) == [0.5, -0.5]
    with pytest.raises(ValueError, match="not groups of 3"): grpo_advantages([1.0, 0.0], 3)


# --- drift: early termination and correction --------------------------------------------------------------------

def test_references_differ_and_pass(world):
    w, refs = world
    for t in w["train"]:
        assert len(refs[t.id]) == 4 * len(t.solutions) >= 4
        assert len({json.dumps([m.get("tool_calls") for m in r["messages"]], sort_keys=True) for r in refs[t.id]}) >= 2   # routes differ
    assert all(len(v) == 1 for v in build_references(w["train"][:2], "single").values())
    with pytest.raises(ValueError, match="references"): build_references(w["train"][:1], "several")


def test_early_termination_stops_drifting_rollouts_only(world):
    w, refs = world
    lost = Script([call("view_file", path="nowhere.py")])
    mon = DriftMonitor(refs, "stop", threshold=0.5, patience=2, max_turns=8)
    recs = run_episodes(w["train"], lost, max_turns=8, monitor=mon)
    assert [r["finish"] for r in recs] == ["drift"] * 4 and [r["turns"] for r in recs] == [2] * 4
    assert mon.stopped == 4 and mon.saved_turns == 4 * 6
    off = run_episodes(w["train"][:1], lost, max_turns=8, max_format_errors=None, monitor=DriftMonitor(refs, "off"))
    assert off[0]["finish"] == "max_turns" and off[0]["turns"] == 8
    good = run_episodes(w["train"], TeacherPolicy(), monitor=(mon := DriftMonitor(refs, "stop", threshold=0.5, patience=1)))
    assert all(r["resolved"] for r in good) and mon.stopped == 0                   # a reference route never drifts


def test_correction_splices_reference_turns_with_no_loss(world, tok):
    w, refs = world
    t = w["train"][0]
    mon = DriftMonitor(refs, "correct", threshold=0.5, patience=2, max_corrections=2, max_turns=8)
    rec = run_episodes([t], Script([call("view_file", path="nowhere.py")]), max_turns=8, monitor=mon)[0]
    spliced = [i for i, m in enumerate(rec["messages"]) if m.get("loss") is False]
    assert len(spliced) == 2 == mon.corrected
    assert rec["messages"][spliced[0]]["tool_calls"][0]["function"] == refs[t.id][0]["messages"][2]["tool_calls"][0]["function"]
    prompt, comp, mask = episode_tokens(rec["messages"], tok)
    assert len(comp) == len(mask) and 0 < sum(mask) < len(mask)
    full = tok.apply_chat_template(rec["messages"], tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert prompt + comp == full[:len(prompt) + len(comp)]
    pos = 0                                                   # walk the completion turn by turn: every assistant span has the right mask
    for m in rec["messages"][2:]:
        if m["role"] != "assistant": continue
        ids = tok(assistant_text(m), add_special_tokens=False)["input_ids"]
        i = next(k for k in range(pos, len(comp)) if comp[k:k + len(ids)] == ids)
        assert set(mask[i:i + len(ids)]) == ({0} if m.get("loss") is False else {1}), m
        pos = i + len(ids)
    # the drift of a corrected rollout comes back under the threshold once the reference's turns are in it
    assert drift(rec["messages"][:spliced[0] + 2], refs[t.id])[0] < 1.0


# --- the stage: kill -9, then dvc repro resumes ------------------------------------------------------------------

@pytest.mark.xdist_group("pipeline")
def test_killed_rft_resumes_from_its_last_checkpoint(sft_repo, tmp_path):
    from test_pipeline import kill_then_resume
    repo = sft_repo                                           # smoke profile, rft.steps 12, a checkpoint every step
    saved, m = kill_then_resume("rft", repo, tmp_path/"killed.log")
    assert m["rft_steps"] == 12 and m["resumed_from"], m


# --- the benchmark (no timing assertions) -------------------------------------------------------------------------

def test_bench_rft_rows(tmp_path, tok):
    import torch
    from kat_nb.model import build_model
    from kat_nb.rft import bench_rft
    torch.manual_seed(0)
    build_model({"source": "config", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "head_dim": 16, "intermediate_size": 64}, tok).save_pretrained(tmp_path); tok.save_pretrained(tmp_path)
    rows = bench_rft(quick=True, model_dir=tmp_path)
    assert [r["config"] for r in rows] == ["drift=off", "drift=stop", "drift=correct"]
    for r in rows:
        assert r["rollouts"] == 8 and r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 and 0 <= r["saved_share"] < 1, r
    assert rows[0]["stopped"] == rows[0]["corrected"] == 0


def test_gated_reference_rewards_only_passing_rollouts(world):
    "A wrong fix near a reference earns its similarity ungated, nothing gated; a passing one keeps it."
    from kat_nb.rft import reward_functions
    w, refs = world
    t = w["train"][0]
    good = teacher_trajectory(t)
    p = {"aggregate": "max", "tau": 0.1, "patch_weight": 0.5, "reward_weights": {"tests": 1.0, "format": 0.1, "reference": 0.2}}
    kw = dict(task=[t, t], files=[t.solutions[0], t.files], references=[refs[t.id]] * 2, messages=[good["messages"]] * 2, resolved=[True, False])
    ungated = reward_functions({**p, "gate_reference": False})[0][2](None, [None, None], **kw)
    gated = reward_functions({**p, "gate_reference": True})[0][2](None, [None, None], **kw)
    assert ungated[1] >= 0.5 and gated[1] == 0.0         # the failing rollout (no patch at all) still follows a reference route
    assert gated[0] == ungated[0] == pytest.approx(1.0)


def test_positive_only_clips_the_negative_advantages_trl_computes(tmp_path, tok):
    "Real TRL GRPO scoring of one group of two rollouts (rewards 1 and 0): +a/-a, and +a/0 with positive_only."
    import torch
    from datasets import Dataset
    from trl import GRPOConfig
    from kat_nb.model import build_model
    from kat_nb.rft import _trainer_class
    torch.manual_seed(0)
    model = build_model({"source": "config", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 16, "intermediate_size": 64}, tok)
    ids = tok("Plan: go.", add_special_tokens=False)["input_ids"]
    def rollout(prompts, trainer):       # two scripted rollouts of one prompt, the first resolved
        return {"prompt_ids": [ids] * len(prompts), "completion_ids": [ids] * len(prompts), "logprobs": None,
                "env_mask": [[1] * len(ids)] * len(prompts), "resolved": [i % 2 == 0 for i in range(len(prompts))]}
    def tests(prompts, completions, resolved, **kw): return [float(r) for r in resolved]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1, use_cpu=True,
                      beta=0.0, report_to=[], disable_tqdm=True, remove_unused_columns=False)
    adv = {}
    for positive in (False, True):
        trainer = _trainer_class(positive)(model=model, reward_funcs=[tests], args=args, processing_class=tok, rollout_func=rollout,
                                           train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 2))
        adv[positive] = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "x"}]} for _ in range(2)])["advantages"].tolist()
    a = adv[False][0]
    assert a > 0 and adv[False] == pytest.approx([a, -a]) and adv[True] == pytest.approx([a, 0.0])
