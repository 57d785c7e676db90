"""The R2D stage end to end: a `dvc repro r2d` killed after its first checkpoint resumes from it (the library parts,
error detection, subtrees and the masked loss, are tested in nbs/lib/18_ide and 19_r2d)."""
import pytest


@pytest.mark.xdist_group("pipeline")
def test_killed_r2d_resumes_from_its_last_checkpoint(sft_repo, tmp_path):
    from test_pipeline import kill_then_resume
    repo = sft_repo                                           # smoke profile, r2d.max_steps 8, a checkpoint every step
    saved, m = kill_then_resume("r2d", repo, tmp_path/"killed.log", steps=8)
    assert m["train_steps"] == 8 and m["resumed_from"].endswith(f"checkpoint-{saved[-1]}"), m
    assert (repo/"data"/"r2d"/"rows.jsonl").exists() and (repo/"models"/"r2d"/"config.json").exists()
    # r2d.merge 0.5: the final weights are halfway between the input's and the last checkpoint's (which stays trained)
    from safetensors.torch import load_file
    w0, w1 = load_file(repo/"models"/"sft"/"model.safetensors"), load_file(repo/"models"/"r2d"/"checkpoints"/"checkpoint-8"/"model.safetensors")
    got = load_file(repo/"models"/"r2d"/"model.safetensors")
    assert m["merge"] == 0.5 and got.keys() == w1.keys()
    for k in got:
        assert (got[k] - (w0[k] + 0.5 * (w1[k] - w0[k]))).abs().max() < 1e-6, k
    assert any((w1[k] - w0[k]).abs().max() > 1e-4 for k in got)     # training moved the weights: the check can fail
