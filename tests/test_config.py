"""Every profile validates here, including the GPU one (its DeepSpeed/accelerate configs must exist and parse)."""
import json
import importlib.util
from pathlib import Path
import pytest, yaml
from kat_nb.config import MATRIX, ParamsError, load_params, stage_parameters, STAGES

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT/"configs"/"profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_validates(profile):
    p = load_params(profile=profile, root=ROOT)
    assert p.base.profile == profile
    for s in STAGES:
        cell = {k: "x" for k in MATRIX.get(s, ())}
        assert stage_parameters(s, p, cell=cell)["profile"] == profile


def test_gpu_profile_is_complete():
    p = load_params(profile="qwen3-0.6b", root=ROOT)
    assert p.model.source == "hub" and p.model.hub_id.startswith("Qwen/Qwen3") and p.model.dtype == "bfloat16"
    assert p.midtrain.bf16 and not p.midtrain.use_cpu
    ds = json.loads((ROOT/p.midtrain.deepspeed).read_text())
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert p.midtrain.global_batch_size % p.midtrain.per_device_batch_size == 0
    acc = yaml.safe_load((ROOT/"configs"/"accelerate_zero2.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED"


def test_smol_profile_points_at_a_packaged_gguf():
    p = load_params(profile="smol", root=ROOT)
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI, not installed)
    spec = importlib.util.find_spec(p.model.gguf_package)
    assert (Path(spec.submodule_search_locations[0])/p.model.gguf_file).is_file()


def test_profile_with_unknown_key_names_the_profile_file(tmp_path):
    (tmp_path/"configs"/"profiles").mkdir(parents=True)
    (tmp_path/"params.yaml").write_text((ROOT/"params.yaml").read_text())
    (tmp_path/"configs"/"profiles"/"tiny.yaml").write_text("midtrain:\n  max_stpes: 3\n")
    with pytest.raises(ParamsError, match=r"configs/profiles/tiny.yaml over params.yaml: midtrain.max_stpes: unknown key \(did you mean 'max_steps'\?\)"):
        load_params(root=tmp_path)


def test_params_yaml_syntax_error_names_the_file(tmp_path):
    (tmp_path/"params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(root=tmp_path)


def test_bare_yaml_off_is_the_off_drift_mode(tmp_path):
    "`dvc exp run -S rft.drift_mode=off` writes a bare `off`, which YAML 1.1 reads as false: it means drift_mode off."
    (tmp_path/"configs"/"profiles").mkdir(parents=True)
    (tmp_path/"params.yaml").write_text((ROOT/"params.yaml").read_text().replace("  drift_mode: stop", "  drift_mode: off", 1))
    (tmp_path/"configs"/"profiles"/"tiny.yaml").write_text("{}\n")
    assert load_params(root=tmp_path).rft.drift_mode == "off"
    (tmp_path/"params.yaml").write_text((ROOT/"params.yaml").read_text().replace("  drift_mode: stop", "  drift_mode: on", 1))
    with pytest.raises(ParamsError, match="rft.drift_mode"):
        load_params(root=tmp_path)


def test_bare_yaml_off_is_the_off_guide(tmp_path):
    "Any `dvc exp run -S ...` dumps params.yaml again, and the default `guide: \"off\"` comes back as a bare `off` (false)."
    import re
    (tmp_path/"configs"/"profiles").mkdir(parents=True)
    (tmp_path/"configs"/"profiles"/"tiny.yaml").write_text("{}\n")
    text = (ROOT/"params.yaml").read_text()
    assert re.search(r"^  guide: ", text, re.M), "params.yaml has no rft.guide line"
    (tmp_path/"params.yaml").write_text(re.sub(r"^  guide: .*$", "  guide: off", text, count=1, flags=re.M))
    assert load_params(root=tmp_path).rft.guide == "off"
    (tmp_path/"params.yaml").write_text(re.sub(r"^  guide: .*$", "  guide: on", text, count=1, flags=re.M))
    with pytest.raises(ParamsError, match="rft.guide"):
        load_params(root=tmp_path)
