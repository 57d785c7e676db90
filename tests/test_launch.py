"""`kat-nb launch` (kat_nb.launch): the accelerate config of a multi-node launch, the global batch kept over the
processes, and a real two-process launch of the midtrain stage on CPU (accelerate launch -> torch.distributed.run ->
two papermill kernels training together with DeepSpeed ZeRO-3 over gloo)."""
import json, os, socket, subprocess, sys, time
from pathlib import Path
import pytest, yaml
from kat_nb.cli import main
from kat_nb.config import load_params
from kat_nb.launch import LaunchError, derived_accum, plan_launch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_config_for_two_nodes_of_eight_gpus(tmp_path, capsys):
    "Node 1 of 2 x 8 GPUs on the ZeRO-3 profile: 16 processes, its machine rank, the DeepSpeed file, 2 accumulation steps."
    rc = main(["launch", "midtrain", "--nodes", "2", "--gpus-per-node", "8", "--node-rank", "1", "--main-ip", "10.0.0.1",
               "--main-port", "29600", "--profile", "qwen3-4b", "--out-root", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cfg = yaml.safe_load((tmp_path/"build/launch/midtrain-2x8.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["num_processes"] == 16 and cfg["num_machines"] == 2
    assert cfg["machine_rank"] == 1 and cfg["main_process_ip"] == "10.0.0.1" and cfg["main_process_port"] == 29600
    assert cfg["rdzv_backend"] == "static" and cfg["use_cpu"] is False
    assert cfg["deepspeed_config"] == {"deepspeed_config_file": "configs/zero3.json", "zero3_init_flag": True,
                                       "deepspeed_multinode_launcher": "standard"}
    assert "global batch 128 = 4 per device x 2 accumulation x 16 processes" in out
    assert (f"accelerate launch --config_file {tmp_path}/build/launch/midtrain-2x8.yaml -m kat_nb.cli run midtrain "
            f"--profile qwen3-4b --params params.yaml --out-root {tmp_path}") in out
    # one node of 8: the same global batch with twice the accumulation; SFT likewise
    one = plan_launch("midtrain", nodes=1, gpus_per_node=8, profile="qwen3-4b", out_root=str(tmp_path))
    assert (one["accum"], one["config"]["num_processes"], one["config"]["machine_rank"]) == (4, 8, 0)
    assert plan_launch("sft", nodes=2, gpus_per_node=8, main_ip="h", profile="qwen3-4b", out_root=str(tmp_path))["accum"] == 2


def test_indivisible_global_batch_fails_early_naming_the_parameter(tmp_path, capsys):
    p = load_params(profile="qwen3-0.6b", root=ROOT)    # 64 rows, 8 per GPU: one node of 8 works, two do not
    assert derived_accum(p, "midtrain", 8) == 1
    with pytest.raises(LaunchError, match=r"midtrain\.global_batch_size=64 is not a multiple of midtrain\.per_device_batch_size \(8\) x 16 processes = 128"):
        derived_accum(p, "midtrain", 16)
    rc = main(["launch", "midtrain", "--nodes", "2", "--gpus-per-node", "8", "--main-ip", "h", "--profile", "qwen3-0.6b",
               "--out-root", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "profile qwen3-0.6b: midtrain.global_batch_size=64" in err and "multiple of 128" in err, err
    assert not (tmp_path/"build/launch/midtrain-2x8.yaml").exists()      # nothing written, nothing started


def test_zero3_gpu_profile():
    "qwen3-4b trains midtrain and SFT on GPUs under ZeRO-3, saving full (gathered) weights."
    p = load_params(profile="qwen3-4b", root=ROOT)
    assert p.model.source == "hub" and p.model.hub_id == "Qwen/Qwen3-4B" and p.model.dtype == "bfloat16"
    for s in (p.midtrain, p.sft):
        assert s.bf16 and not s.use_cpu and s.deepspeed == "configs/zero3.json"
        z = json.loads((ROOT/s.deepspeed).read_text())["zero_optimization"]
        assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
        assert s.global_batch_size % (s.per_device_batch_size * 16) == 0       # 1 x 8 and 2 x 8 GPUs both keep it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _tiny_inputs(out: Path) -> Path:
    "What the data and tokenizer stages would leave in `out` (a small corpus, its tokenizer, the base model) and a params file."
    sys.path.insert(0, str(ROOT/"tests"))
    from test_train import corpus
    from kat_nb.core import write_jsonl
    from kat_nb.model import row_text, save_base, train_tokenizer
    raw = yaml.safe_load((ROOT/"params.yaml").read_text())
    raw["base"] = {**raw["base"], "profile": "tiny"}       # tiny.yaml overrides nothing: this file's values hold
    raw["midtrain"].update(max_steps=4, warmup_steps=1, global_batch_size=8, per_device_batch_size=4, seq_len=64,
                           eval_steps=2, save_steps=2, logging_steps=1, eval_samples=8, tree_packing=False, deepspeed=None)
    raw["model"].update(source="config", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, max_position_embeddings=512)
    (out/"params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = corpus(160)
    write_jsonl(out/"data/midtrain/train.jsonl", rows[16:]); write_jsonl(out/"data/midtrain/valid.jsonl", rows[:16])
    tok = train_tokenizer([row_text(r) for r in rows], vocab_size=320, min_frequency=2)
    tok.save_pretrained(out/"models/tokenizer")
    save_base(load_params(out/"params.yaml", root=ROOT).model.model_dump(), tok, out/"models/base", seed=0)
    return out/"params.yaml"


def test_two_cpu_processes_through_kat_nb_launch(tmp_path):
    """`kat-nb launch midtrain --cpu` with 2 processes: accelerate's DeepSpeed launcher starts both, each runs the stage
    notebook under papermill, the Trainers train together (ZeRO-3 over gloo, the qwen3-4b profile's engine), rank 0 owns
    the run's outputs, and the stage's own sample cell loads the saved model whole in the same process
    (`train_and_save` unsets transformers' process-wide DeepSpeed config after saving)."""
    params = _tiny_inputs(tmp_path)
    cmd = [str(BIN/"kat-nb"), "launch", "midtrain", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--deepspeed",
           "configs/zero3.json", "--params", str(params), "--out-root", str(tmp_path), "--main-port", str(_free_port())]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "global batch 8 = 4 per device x 1 accumulation x 2 processes" in out.stdout
    assert "1 accum x 2 processes" in log                                  # what run_midtrain saw inside the kernel
    assert "rank 1 of 2" in log and "deepspeed_shm_comm_op built" not in log   # no JIT compile on CPU
    # rank 0's outputs are the run's; rank 1's executed notebook and metrics live apart
    rec = json.loads((tmp_path/"metrics/midtrain.run.json").read_text())
    assert rec["processes"] == 2 and rec["parameters"]["deepspeed"] == "configs/zero3.json"
    assert rec["parameters"]["out_root"] == str(tmp_path) and rec["executed"] == str(tmp_path/"runs/03_midtrain.ipynb")
    rank1 = tmp_path/"build/ranks/midtrain-rank1"
    assert (rank1/"runs/03_midtrain.ipynb").exists() and (rank1/"metrics/midtrain.json").exists()
    assert not (rank1/"metrics/midtrain.run.json").exists() and not (rank1/"dvclive").exists()
    assert (tmp_path/"dvclive/midtrain/metrics.json").exists()
    m = json.loads((tmp_path/"metrics/midtrain.json").read_text())
    assert m["train_steps"] == 4 and m["val_loss_end"] < m["val_loss_start"]
    # DeepSpeed's sharded state for resuming, and full weights in the model folder (the notebook's sample cell loaded them too)
    assert (tmp_path/"models/midtrain/checkpoints/checkpoint-4/global_step4").is_dir()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path/"models/midtrain")
    assert model.get_input_embeddings().weight.shape == (model.config.vocab_size, 64)
    print(f"two-process launch: {time.time() - t:.1f} s")
