"""The environment and evaluation end to end: the teacher through the real environment on held-out tasks,
rollout records in the teacher's schema, bad input reported with file and line."""
import json, time
import pytest
from kat_nb.core import DataFileError, read_jsonl, write_jsonl
from kat_nb.env import TeacherPolicy, run_episodes, summarize
from kat_nb.world import make_world, teacher_trajectory


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_train=10, n_valid=5, n_test=100)


def test_teacher_resolves_held_out_tasks_through_the_environment(world):
    recs = run_episodes(world["test"], TeacherPolicy())
    m = summarize(recs)
    assert m["tasks"] == 100 and m["env_errors"] == 0
    assert m["resolve_rate"] >= 0.95, m
    assert m["bug_kind/wrong_variable/resolve_rate"] >= 0.95, m      # the held-out kind too
    assert m["tool_error_rate"] == 0.0
    split = summarize(recs, ["wrong_variable"])
    assert split["seen_kinds/tasks"] + split["unseen_kinds/tasks"] == 100 and split["unseen_kinds/tasks"] == round(100 / 3)
    assert split["unseen_kinds/resolve_rate"] == m["bug_kind/wrong_variable/resolve_rate"] and "seen_kinds/tasks" not in m
    fails = [{**r, "resolved": r["bug_kind"] != "wrong_variable"} for r in recs]
    assert summarize(fails, ["wrong_variable"])["seen_kinds/resolve_rate"] == 1.0 and summarize(fails, ["wrong_variable"])["unseen_kinds/resolve_rate"] == 0.0


class _Scripted:
    "A policy replaying fixed turns (the same list for every episode)."
    name = "scripted"
    def __init__(self, turns): self.turns = turns
    def act(self, episodes): return [self.turns[min(e.turns, len(self.turns) - 1)] for e in episodes]


def test_episodes_end_after_consecutive_format_errors(world):
    task = world["test"][0]
    babble = "I think the bug is somewhere."
    call = '<tool_call>\n{"name": "run_tests", "arguments": {}}\n</tool_call>'
    broken = '<tool_call>\n{"name": "run_tests", "arguments": {</tool_call>'
    r = run_episodes([task], _Scripted([babble]))[0]                     # never a tool call: done after 2 turns
    assert (r["finish"], r["turns"], r["resolved"]) == ("format_errors", 2, False)
    r = run_episodes([task], _Scripted([babble, broken, babble]), max_format_errors=3)[0]   # malformed calls count too
    assert (r["finish"], r["turns"]) == ("format_errors", 3)
    r = run_episodes([task], _Scripted([babble, call, babble, call, babble, call, babble, call]))[0]   # not in a row
    assert (r["finish"], r["turns"]) == ("max_turns", 8)
    r = run_episodes([task], _Scripted([babble]), max_format_errors=None)[0]                             # never
    assert (r["finish"], r["turns"]) == ("max_turns", 8)


def test_rollout_records_have_the_teacher_schema(world):
    task = world["test"][0]
    rollout = run_episodes([task], TeacherPolicy())[0]
    teacher = teacher_trajectory(task)
    assert set(teacher) <= set(rollout)
    assert [m["role"] for m in rollout["messages"]] == [m["role"] for m in teacher["messages"]]
    assert [s["status"] for s in rollout["steps"]] == [s["status"] for s in teacher["steps"]]
    assert all(rollout["messages"][s["message_index"]]["role"] == "assistant" for s in rollout["steps"])


def test_broken_trajectory_file_names_file_and_line(tmp_path, world):
    path = tmp_path/"trajectories.jsonl"
    write_jsonl(path, [teacher_trajectory(t) for t in world["train"][:3]])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]              # a line cut in half, as by a killed writer
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=rf"{path}:2: malformed JSON"):
        list(read_jsonl(path))


def test_tool_threads_change_nothing_but_time(world):
    "A round's tool calls run in threads (`tool_workers`); every record equals the one-thread run's, in order."
    tasks = world["test"][:12]
    one, four = run_episodes(tasks, TeacherPolicy(), tool_workers=1), run_episodes(tasks, TeacherPolicy(), tool_workers=4)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}
    assert [strip(r) for r in one] == [strip(r) for r in four]
    assert sum(r["resolved"] for r in four) == 12


class _StreamingTeacher(TeacherPolicy):
    "The teacher, handing each turn over the moment it is written (as `HFPolicy` with the cross-turn cache does)."
    def __init__(self):
        super().__init__(); self.started_inside = 0
    def act(self, episodes, on_turn=None):
        texts = super().act(episodes)
        for e, text in zip(episodes, texts):
            n = len(e.messages)
            on_turn(e, text)
            deadline = time.time() + 10
            while len(e.messages) == n and time.time() < deadline: time.sleep(0.002)   # its step starts while act goes on
            self.started_inside += len(e.messages) > n
        return texts


def test_tool_calls_overlap_generation_and_change_nothing(world):
    "With a policy that streams its turns, each episode's tools start before `act` returns; the records are the plain run's."
    tasks = world["test"][:6]
    pol = _StreamingTeacher()
    streamed, plain = run_episodes(tasks, pol), run_episodes(tasks, TeacherPolicy(), overlap=False)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}
    assert [strip(r) for r in streamed] == [strip(r) for r in plain]
    assert pol.started_inside == sum(r["turns"] for r in streamed) > 0
