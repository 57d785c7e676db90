"""Shared pytest set-up: offline, one torch thread per test process, the repository root."""
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
# No Hub access at run time, ever; tests build tiny models from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers on two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the network or many minutes; runs only with KAT_NB_SLOW=1")


def pytest_collection_modifyitems(config, items):
    "Tests marked slow are skipped unless KAT_NB_SLOW=1."
    if os.environ.get("KAT_NB_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set KAT_NB_SLOW=1 to run it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sft_repo(tmp_path_factory) -> Path:
    """A copy of the repository on the smoke profile with `dvc repro sft` done, for the kill-and-resume tests of the
    stages after SFT (`rft`, `r2d`, `rl`; both in the xdist group "pipeline", so one worker builds it once). Their profile keys
    are set here, before the first run: the profile is a dependency of every stage."""
    import yaml
    from test_pipeline import copy_repo, _sh
    repo = copy_repo(tmp_path_factory.mktemp("sft_repo")/"repo")
    prof = repo/"configs"/"profiles"/"smoke.yaml"
    p = yaml.safe_load(prof.read_text())
    p["rft"].update(steps=12, save_every=1)
    p["rl"].update(steps=8, save_every=1)
    p["r2d"].update(max_steps=8, save_steps=1, eval_steps=4, model_tasks=0, own_misses=0, merge=0.5)   # no model episodes: the test is about training
    prof.write_text(yaml.safe_dump(p))
    _sh(["dvc", "repro", "sft"], repo)
    return repo
