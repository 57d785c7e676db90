"""Record a timed from-scratch `dvc repro` as `metrics/repro_time.json`, side by side with an older commit's.

Issue 17 compares the part of the pipeline that existed before the throughput work (data -> tokenizer -> midtrain ->
sft, their world and HumanEval evaluations, the teacher's, and the report) on the same machine: the older commit runs
in a worktree of its own with an empty DVC cache, this one runs in two `dvc repro` calls, the first limited to that
part (its targets below), the second the rest of the curriculum. Each call is timed from outside (`/usr/bin/time -v`):

    git worktree add ../old ffdde22 && (cd ../old && PYTHONPATH=$PWD /usr/bin/time -v dvc repro > old.log 2>&1)
    mv .dvc/cache <elsewhere> && mkdir .dvc/cache                      # a fresh clone's state: nothing to restore
    /usr/bin/time -v dvc repro $(python scripts/repro_time.py --targets) > part.log 2>&1
    /usr/bin/time -v dvc repro > rest.log 2>&1
    python scripts/repro_time.py --part part.log --rest rest.log --old ../old --old-log old.log --old-commit ffdde22

This script only reads what those runs wrote (each stage's `<stage>.run.json` wall time, the `time -v` logs).
"""
import argparse, json, os, platform, re, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = ["baseline@world", "baseline@humaneval"] + [f"eval@{c}-{s}" for c in ("base", "midtrain", "sft") for s in ("world", "humaneval")]
PART_STAGES = ["strip", "data", "tokenizer", "midtrain", "sft", "report"]   # strip and the report: seconds


def elapsed(log: Path) -> float:
    "The wall clock `/usr/bin/time -v` wrote at the end of `log`, in seconds."
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log.read_text())
    if not m: raise SystemExit(f"{log}: no '/usr/bin/time -v' summary (did the run finish?)")
    *hm, s = m.group(1).split(":")
    return round(sum(float(x) * 60 ** (len(hm) - i) for i, x in enumerate(hm)) + float(s), 1)


def walls(metrics: Path) -> dict:
    "Each stage's and evaluation cell's wall time from its run record."
    out = {}
    for f in sorted(metrics.glob("*.run.json")) + sorted(metrics.glob("*/*.run.json")):
        name = f.name.removesuffix(".run.json") if f.parent == metrics else f"{f.parent.name}/{f.name.removesuffix('.run.json')}"
        out[name] = json.loads(f.read_text()).get("wall_s")
    return out


def part_of(w: dict) -> float:
    "Seconds of the part that existed before issue 17 (stages + world/HumanEval cells of base, midtrain, sft, teacher)."
    cells = [f"{c}/{s}" for c in ("teacher", "base", "midtrain", "sft") for s in ("world", "humaneval")]
    return round(sum(w.get(k) or 0 for k in PART_STAGES[1:] + cells), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", action="store_true", help="print the part's dvc targets and stop")
    ap.add_argument("--part", type=Path); ap.add_argument("--rest", type=Path)
    ap.add_argument("--old", type=Path); ap.add_argument("--old-log", type=Path); ap.add_argument("--old-commit")
    a = ap.parse_args()
    if a.targets: return print(" ".join(PART))
    from kat_nb.eval import time_table
    metrics = ROOT/"metrics"
    new_w, old_w = walls(metrics), walls(a.old/"metrics")
    part, rest, old = elapsed(a.part), elapsed(a.rest), elapsed(a.old_log)
    part_report = round(part + (new_w.get("report") or 0), 1)     # the report runs in the second call (it reads every stage)
    sft, old_sft = (json.loads((d/"metrics"/"sft.json").read_text()) for d in (ROOT, a.old))
    world = lambda d, c: json.loads((d/"metrics"/c/"world.json").read_text())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec = {"record": "dvc repro from scratch (empty DVC cache), tiny profile, seed 0, side by side with an older commit on the same machine",
           "command": "scripts/repro_time.py (its docstring has the commands)", "git": git, "old_commit": a.old_commit,
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "side_by_side": {
               "part": "data -> tokenizer -> midtrain -> sft, the world and HumanEval cells of base, midtrain, sft and the teacher, the report",
               "old_dvc_repro_wall_s": old, "new_part_dvc_repro_wall_s": part_report, "ratio": round(part_report / old, 3),
               "old_stage_and_cell_wall_s": part_of(old_w), "new_stage_and_cell_wall_s": part_of(new_w),
               "old": {k: old_w.get(k) for k in PART_STAGES[1:]}, "new": {k: new_w.get(k) for k in PART_STAGES[1:]},
               "sft_train_tokens": {"old": old_sft.get("train_tokens"), "new": sft.get("train_tokens")},
               "sft_world_resolve_rate": {"old": world(a.old, "sft").get("resolve_rate"), "new": world(ROOT, "sft").get("resolve_rate")}},
           "dvc_repro_wall_s": round(part + rest, 1), "part_wall_s": part, "rest_wall_s": rest,
           **time_table(metrics),
           "world_resolve_rate": {c: world(ROOT, c).get("resolve_rate") for c in ("teacher", "base", "midtrain", "sft", "rft", "r2d", "rl")
                                  if (metrics/c/"world.json").exists()}}
    (metrics/"repro_time.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec["side_by_side"], indent=1), "\ntotal", rec["dvc_repro_wall_s"])


if __name__ == "__main__":
    main()
