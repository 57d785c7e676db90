"Mid-training data (kat_nb.data): determinism, instruction checkers, dedup, loaders, diffs, the stage output."
import contextlib, io, json, os, random
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kat_nb.core import DataFileError, read_jsonl, repo_root
from kat_nb.world import make_world, teacher_trajectory
from kat_nb.data import (apply_unified_diff, build_data, chat_row, dedup_rows, diff_samples, heldout_texts, load_text_rows,
                         split_rows, task_text, text_row, unified_diff)
from kat_nb.reasoning import program_trace, reasoning_rows
from kat_nb.instructions import CHECKS, check_instruction, instruction_rows, instruction_sample

FIXTURES = repo_root()/"data"/"fixtures"
TINY_WORLD = {"n_train": 8, "n_valid": 2, "n_test": 3, "held_out_bug_kinds": ["wrong_variable"]}
TINY_MT = {"stdlib_files": 4, "chunk_chars": 1500, "stdlib_diffs": 6, "reasoning": 12, "instructions": 12, "agentic": 8,
           "valid_fraction": 0.2, "dedup_threshold": 0.8, "dedup_num_perm": 32, "shingle_words": 5, "probe_per_kind": 1}


@pytest.fixture(scope="module")
def tiny_world():
    return make_world(0, 4, 1, 3, ["wrong_variable"])


# --- determinism -------------------------------------------------------------------------------------------

def test_generators_deterministic_by_seed():
    assert reasoning_rows(20, seed=3) == reasoning_rows(20, seed=3)
    assert reasoning_rows(20, seed=3) != reasoning_rows(20, seed=4)
    assert instruction_rows(20, seed=3) == instruction_rows(20, seed=3)
    assert instruction_rows(20, seed=3) != instruction_rows(20, seed=4)
    a, b = diff_samples(5, 30, seed=1), diff_samples(5, 30, seed=1)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in a] != [d.text for d in diff_samples(5, 30, seed=2)]


def test_build_data_deterministic(tmp_path):
    cards = []
    for d in ("a", "b"):
        cards.append(build_data(tmp_path/d, 0, TINY_WORLD, TINY_MT))
    for rel in ("midtrain/train.jsonl", "midtrain/valid.jsonl", "world/train.jsonl", "world/test.jsonl",
                "world/trajectories/train.jsonl", "world/trajectories/valid.jsonl", "world/trajectories/test.jsonl"):
        assert (tmp_path/"a"/rel).read_bytes() == (tmp_path/"b"/rel).read_bytes(), rel
    strip = lambda c: {k: v for k, v in c.items() if k not in ("seconds", "dedup_seconds")}
    assert strip(cards[0]) == strip(cards[1])
    card = json.loads((tmp_path/"a"/"cards"/"midtrain.json").read_text())
    assert set(card["components"]) == {"code", "diff", "reasoning", "agentic", "instructions"}
    for c in card["components"].values():
        assert {"samples", "chars", "words", "dedup_removed", "heldout_removed"} <= set(c)
        assert c["samples"] == c["train"] + c["valid"] and c["valid"] >= 1
    rows = list(read_jsonl(tmp_path/"a"/"midtrain"/"train.jsonl")) + list(read_jsonl(tmp_path/"a"/"midtrain"/"valid.jsonl"))
    assert len(rows) == card["total"]["samples"]
    for r in rows:
        assert r["component"] in card["components"]
        assert ("text" in r) != ("messages" in r)
        if "messages" in r: assert isinstance(r["tools"], list)
    # the held-out bug kind never appears in a task or a trajectory; the commits hold it by default (commits broad,
    # trajectories narrow: data.midtrain.commit_kinds all), and not at all with commit_kinds: trained
    train_kinds = {t["meta"]["bug_kind"] for t in read_jsonl(tmp_path/"a"/"world"/"train.jsonl")}
    assert "wrong_variable" not in train_kinds and "wrong_variable" not in card["kinds"]["agentic"]
    commit = lambda rows: any(r["text"].startswith("commit ") and "wrong variable" in r["text"] for r in rows if "text" in r)
    assert commit(rows) and "wrong_variable" in card["kinds"]["diff"]
    narrow = build_data(tmp_path/"c", 0, TINY_WORLD, {**TINY_MT, "commit_kinds": "trained"})
    assert not commit(read_jsonl(tmp_path/"c"/"midtrain"/"train.jsonl")) and "wrong_variable" not in narrow["kinds"]["diff"]
    probe = list(read_jsonl(tmp_path/"c"/"midtrain"/"probe.jsonl"))   # the probe still scores every kind, marked
    assert probe and all(r["in_commits"] == (r["kind"] != "wrong_variable") for r in probe)


# --- instruction following ---------------------------------------------------------------------------------

CASES = [  # (constraint, a response that passes, one that fails)
    ({"type": "word_count_max", "n": 4}, "tests catch bugs early", "tests catch many bugs very early"),
    ({"type": "word_count_min", "n": 4}, "tests catch bugs early", "tests help"),
    ({"type": "sentence_count", "n": 2}, "Tests help. Reviews help too.", "Tests help."),
    ({"type": "bullet_count", "n": 2}, "- one\n- two", "- one\n- two\n- three"),
    ({"type": "paragraph_count", "n": 2}, "First part.\n\n***\n\nSecond part.", "Only one part."),
    ({"type": "include_keywords", "keywords": ["review", "tests"]}, "Tests make review easier.", "Reviews are useful."),
    ({"type": "exclude_keywords", "keywords": ["simply"]}, "Write tests.", "Simply write tests."),
    ({"type": "keyword_frequency", "keyword": "test", "n": 2}, "A test per bug and a test per feature.", "A test per bug."),
    ({"type": "all_lowercase"}, "all lowercase here.", "Not lowercase."),
    ({"type": "all_uppercase"}, "ALL CAPS HERE.", "Not all caps."),
    ({"type": "json_keys", "keys": ["summary", "risk"]}, '{"summary": "a", "risk": "b"}', '{"summary": "a"}'),
    ({"type": "start_with", "phrase": "In short"}, "In short: test first.", "Test first, in short."),
    ({"type": "end_with", "phrase": "That is all for now."}, "Test first. That is all for now.", "That is all for now. Bye."),
    ({"type": "title"}, "<<Testing>>\n\nTest first.", "Testing: test first."),
    ({"type": "no_commas"}, "Test first and often.", "Test first, and often."),
    ({"type": "quotation"}, '"Test first."', "Test first."),
    ({"type": "highlights", "n": 2}, "Use *small commits* and *clear names*.", "Use *small commits* and clear names."),
    ({"type": "placeholders", "n": 2}, "Ask [owner] about [project].", "Ask [owner] about it."),
    ({"type": "postscript"}, "Test first.\n\nP.S. Review too.", "Test first. Review too."),
    ({"type": "code_block"}, "Run:\n```python\nprint(1)\n```", "Run print(1)."),
]


def test_every_category_has_a_case():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKS) and len(CHECKS) >= 12


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[c["type"] for c, _, _ in CASES])
def test_instruction_checkers(constraint, good, bad):
    assert check_instruction(constraint, good)
    assert not check_instruction(constraint, bad)


def test_unknown_constraint_is_an_error():
    with pytest.raises(KeyError, match="unknown constraint type"): check_instruction({"type": "rhyme"}, "x")


def test_generated_instruction_samples_pass_their_checkers():
    rng = random.Random(11)
    samples = [instruction_sample(rng) for _ in range(500)]
    assert {c["type"] for s in samples for c in s["constraints"]} == set(CHECKS)
    for s in samples:
        assert all(check_instruction(c, s["response"]) for c in s["constraints"]), s
        assert s["topic"] in s["prompt"]
    rows = instruction_rows(5, seed=0)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"] and rows[0]["tools"] == []


# --- reasoning ---------------------------------------------------------------------------------------------

def test_program_traces_answer_what_the_program_prints():
    rng = random.Random(0)
    for _ in range(60):
        p = program_trace(rng)
        out = io.StringIO()
        with contextlib.redirect_stdout(out): exec(p["problem"], {})
        assert p["answer"] == out.getvalue().strip()
        assert "Check:" in p["text"] and p["text"].endswith(f"Answer: {p['answer']}")


def test_reasoning_rows_have_reflection_and_distinct_texts():
    rows = reasoning_rows(200, seed=0)
    assert len({r["text"] for r in rows}) == 200
    assert all("Check:" in r["text"] and "Answer:" in r["text"] for r in rows)


# --- near-duplicate removal --------------------------------------------------------------------------------

def test_dedup_removes_planted_near_duplicates_and_keeps_distinct_rows():
    base = reasoning_rows(40, seed=5)
    near = [text_row("reasoning", r["text"] + " (checked twice)") for r in base[:5]]
    exact = [dict(base[7])]
    rep = dedup_rows(base + near + exact, threshold=0.8, num_perm=64, k=5)
    assert rep.removed["reasoning"] == 6
    assert rep.kept == base   # the first of each group is kept, distinct rows all survive


def test_dedup_against_heldout_tasks(tiny_world):
    test = tiny_world["test"]
    held = heldout_texts(test, [teacher_trajectory(t) for t in test])
    replay = teacher_trajectory(test[1])
    planted = [text_row("code", task_text(test[0])), chat_row("agentic", replay["messages"], replay["tools"])]
    ordinary = reasoning_rows(10, seed=0) + [chat_row("agentic", teacher_trajectory(t)["messages"]) for t in tiny_world["train"]]
    rep = dedup_rows(ordinary + planted, held)
    assert rep.removed_heldout == {"reasoning": 0, "agentic": 1, "code": 1}
    assert len(rep.kept) == len(ordinary)


# --- split -------------------------------------------------------------------------------------------------

def test_split_is_stratified_and_deterministic():
    rows = reasoning_rows(100, seed=0) + instruction_rows(20, seed=0)
    tr, va = split_rows(rows, 0.1, seed=0)
    assert sum(r["component"] == "reasoning" for r in va) == 10 and sum(r["component"] == "instructions" for r in va) == 2
    assert (tr, va) == split_rows(rows, 0.1, seed=0) and (tr, va) != split_rows(rows, 0.1, seed=1)
    assert len(tr) + len(va) == len(rows)


# --- loaders -----------------------------------------------------------------------------------------------

def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path/"corpus.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(DataFileError, match=r"corpus\.jsonl:4:"): list(read_jsonl(bad))
    with pytest.raises(DataFileError, match=r"corpus\.jsonl:4:"): list(load_text_rows({"path": str(bad), "cache_dir": str(tmp_path/"c")}))


def test_load_text_rows_jsonl_and_parquet(tmp_path):
    cache = str(tmp_path/"hf")
    jl = list(load_text_rows({"path": str(FIXTURES/"hf_text.jsonl"), "split": "train", "text_field": "text", "cache_dir": cache}))
    pq = list(load_text_rows({"path": "data/fixtures/hf_text.parquet", "text_field": "text", "cache_dir": cache}))
    assert jl == pq and len(jl) == 4   # the empty text row is skipped
    assert all(r == {"component": "code", "text": r["text"]} for r in jl)
    assert list(load_text_rows({"path": str(FIXTURES/"hf_text.jsonl"), "max_rows": 2, "cache_dir": cache})) == jl[:2]
    for f in ("hf_chat.jsonl", "hf_chat.parquet"):
        ch = list(load_text_rows({"path": str(FIXTURES/f), "messages_field": "messages", "cache_dir": cache}))
        assert len(ch) == 2 and ch[0]["component"] == "agentic" and ch[0]["tools"] == []
        assert [m["role"] for m in ch[0]["messages"]] == ["user", "assistant"]
    with pytest.raises(KeyError, match="no column 'body'"):
        list(load_text_rows({"path": str(FIXTURES/"hf_text.jsonl"), "text_field": "body", "cache_dir": cache}))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(load_text_rows({"path": "data/fixtures/missing.jsonl"}))


def test_build_data_reads_hf_rows(tmp_path):
    mt = {**TINY_MT, "stdlib_files": 1, "stdlib_diffs": 0, "reasoning": 2, "instructions": 2, "agentic": 2}
    card = build_data(tmp_path, 0, {**TINY_WORLD, "n_train": 2, "n_valid": 1, "n_test": 1}, mt,
                      {"path": str(FIXTURES/"hf_text.jsonl"), "split": "train", "text_field": "text", "cache_dir": str(tmp_path/"hf")})
    texts = {r.get("text") for f in ("train", "valid") for r in read_jsonl(tmp_path/"midtrain"/f"{f}.jsonl")}
    assert any(t and t.startswith("Fix off-by-one in pagination") for t in texts)
    assert card["hf"].endswith("hf_text.jsonl")


# --- diffs -------------------------------------------------------------------------------------------------

def test_diff_samples_apply():
    samples = diff_samples(25, 60, seed=0)
    assert len(samples) == 25
    for s in samples:
        buggy, fixed = s.files()
        assert buggy != fixed
        assert apply_unified_diff(buggy, s.diff) == fixed
        assert s.text.startswith("commit ") and f"in {s.module}.{s.qualname}" in s.text and s.diff in s.text
    held = diff_samples(10, 60, seed=0, kinds=["operator_swap"])
    assert {s.kind for s in held} == {"operator_swap"}


def test_apply_unified_diff_refuses_a_mismatch():
    old, new = "a\nb\nc\n", "a\nB\nc\n"
    d = unified_diff(old, new, "f.py")
    assert apply_unified_diff(old, d) == new
    with pytest.raises(ValueError, match="does not apply"): apply_unified_diff("a\nX\nc\n", d)
