"""Record the stage results now in the workspace as one arm of an ablation table.

An ablation arm is a real pipeline run (`dvc repro`, or `dvc exp run -S key=value`); this script only reads what that
run wrote (`metrics/<stage>.json`, `metrics/<stage>/world.json`, `params.yaml`) and adds or replaces one row of
`metrics/ablations/<table>.json` (keyed by arm and seed), with the binomial standard error of each resolve rate.

    python scripts/record_arm.py --table rft_references --arm multi --stage rft
    python scripts/record_arm.py --table r2d_ablations --arm mask+tree --stage r2d --suites world,recovery
    python scripts/record_arm.py --table rl_ablations --arm default --stage rl
    python scripts/record_arm.py --table midtrain_transfer --arm "base input" --stage sft --keys data.midtrain.commit_kinds,sft.input --probe

`--edit-turn` scores the teacher-forced diagnosis (`kat_nb.eval.edit_turn_accuracy`) of `models/<stage>` again with the
code of today, for arms whose world evaluation ran before a fix to that metric (the row says `edit_turn/recomputed`).
"""
import argparse, json, math
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def se(p, n): return round(math.sqrt(p * (1 - p) / n), 4) if n else None


def edit_turn(stage: str, params: dict) -> dict:
    "The edit-turn metrics of models/<stage> on the held-out split, computed now."
    from kat_nb.eval import edit_turn_accuracy
    from kat_nb.world import Task
    w = params["data"]["world"]
    tasks = [Task.from_dict(json.loads(l)) for l in (ROOT/"data"/"world"/"test.jsonl").read_text().splitlines()]
    tasks = tasks[:params.get("eval", {}).get("world_tasks") or len(tasks)]
    return edit_turn_accuracy(ROOT/"models"/stage, tasks, set(w.get("held_out_bug_kinds") or ())) | {"edit_turn/recomputed": True}


def row(stage: str, arm: str, suites: tuple = ("world",), keys: tuple = (), probe: bool = False, recompute_edit_turn: bool = False) -> dict:
    params = yaml.safe_load((ROOT/"params.yaml").read_text())
    run = json.loads((ROOT/"metrics"/f"{stage}.json").read_text()) if (ROOT/"metrics"/f"{stage}.json").exists() else {}
    out = {"arm": arm, "seed": params["base"]["seed"], "stage": stage, "params": params.get(stage, {})}
    for key in keys:            # other sections' parameters that tell the arm apart, e.g. data.midtrain.commit_kinds
        v = params
        for part in key.split("."): v = v[part]
        out[key] = v
    for suite in suites:       # world's keys unprefixed (the RFT tables), other suites' as `<suite>/...`
        m, pre = json.loads((ROOT/"metrics"/stage/f"{suite}.json").read_text()), "" if suite == "world" else f"{suite}/"
        for key, n in (("resolve_rate", m["tasks"] - m["env_errors"]), ("seen_kinds/resolve_rate", m.get("seen_kinds/tasks")),
                       ("unseen_kinds/resolve_rate", m.get("unseen_kinds/tasks"))):
            if m.get(key) is not None: out[pre + key], out[pre + key.replace("resolve_rate", "se")] = m[key], se(m[key], n)
        out[pre + "tool_error_rate"] = m.get("tool_error_rate")
        out.update({pre + k: v for k, v in m.items() if k.startswith(("variant/", "edit_turn/"))})
        out[pre + "mean_turns"] = m.get("mean_turns")
        recs = ROOT/"metrics"/stage/f"{suite}.records.jsonl"
        if recs.exists():       # the turns a resolved episode took (RL's claim: fewer)
            won = [r["turns"] for r in map(json.loads, recs.read_text().splitlines()) if r.get("resolved")]
            out[pre + "resolved_mean_turns"] = round(sum(won) / len(won), 3) if won else None
    if probe:                   # the midtrain stage's probe (fix-token loss and exact rate on unseen commits) for this arm's data
        pr = json.loads((ROOT/"metrics"/"midtrain.json").read_text()).get("probe", {})
        for model, groups in pr.items():
            for g in ("trained", "held_out"):
                if g in groups: out[f"probe/{model}/{g}/loss"], out[f"probe/{model}/{g}/exact"] = groups[g]["loss"], groups[g]["exact"]
    if recompute_edit_turn: out.update(edit_turn(stage, params))
    if "card" in run: out["masked_share"], out["rows"] = run["card"].get("masked_share"), run["card"].get("rows")
    for k in ("rft_steps", "rollouts_this_run", "stopped_this_run", "corrected_this_run", "generated_tokens_this_run", "saved_share",
              "reward_first", "reward_last", "train_steps", "epochs", "seconds", "rollout_seconds", "update_seconds",
              "steps", "seconds_this_run", "pass_rate_first", "pass_rate_last", "entropy_first", "entropy_last", "turns_first",
              "turns_last", "resolved_turns_first", "resolved_turns_last", "kl_last", "pruned_share_mean", "ideal_token_ratio"):
        if k in run: out[k] = run[k]
    if run.get("rollouts_this_run"):
        out["early_stop_rate"] = round(run.get("stopped_this_run", 0) / run["rollouts_this_run"], 4)
    curves = {"tests_reward": "rewards/tests/mean"}          # RFT: the tests-reward curve; RL: the reshaping ablation's plot
    if stage == "rl": curves = {n: n for n in ("entropy", "pass_rate", "resolved_turns")}
    for name, rel in curves.items():                          # one value per step, from the stage's DVCLive tsv
        tsv = ROOT/"dvclive"/stage/"plots"/"metrics"/stage/f"{rel}.tsv"
        if tsv.exists(): out[f"{name}_curve"] = [round(float(r.split("\t")[1]), 4) for r in tsv.read_text().splitlines()[1:]]
    return out


def curve_table(table: dict, name: str, path: Path) -> None:
    "One CSV column `<arm>_seed<k>` per row of `table` with a `<name>_curve`, by step: the file a DVC plot draws (dvc.yaml `plots`)."
    arms = sorted((r for r in table["rows"] if r.get(f"{name}_curve")), key=lambda r: r["seed"])
    if not arms: return
    col = lambda r: "".join(c if c.isalnum() else "_" for c in r["arm"]).strip("_") + f"_seed{r['seed']}"
    n = max(len(r[f"{name}_curve"]) for r in arms)
    lines = [",".join(["step"] + [col(r) for r in arms])]
    for i in range(n):
        lines.append(",".join([str(i + 1)] + [str(r[f"{name}_curve"][i]) if i < len(r[f"{name}_curve"]) else "" for r in arms]))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True); ap.add_argument("--arm", required=True); ap.add_argument("--stage", default="rft")
    ap.add_argument("--suites", default="world", help="comma-separated eval suites of the stage's checkpoint to record (world first)")
    ap.add_argument("--keys", default="", help="comma-separated dotted params.yaml keys to record beside the stage's own section")
    ap.add_argument("--probe", action="store_true", help="record the midtrain probe (metrics/midtrain.json) too")
    ap.add_argument("--edit-turn", action="store_true", help="score edit_turn/* of models/<stage> again with today's code")
    a = ap.parse_args()
    path = ROOT/"metrics"/"ablations"/f"{a.table}.json"
    table = json.loads(path.read_text()) if path.exists() else {"table": a.table, "rows": []}
    r = row(a.stage, a.arm, tuple(a.suites.split(",")), tuple(k for k in a.keys.split(",") if k), a.probe, a.edit_turn)
    table["rows"] = [x for x in table["rows"] if (x["arm"], x["seed"]) != (r["arm"], r["seed"])] + [r]
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(table, indent=2) + "\n")
    if a.stage == "rl":          # metrics/ablations/<table>.entropy.csv: the entropy curve of every arm and seed (a DVC plot)
        curve_table(table, "entropy", path.with_suffix(".entropy.csv"))
    print(json.dumps({k: v for k, v in r.items() if k != "params"}))
