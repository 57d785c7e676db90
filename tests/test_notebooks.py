"""Every notebook under nbs/ runs as one pytest test through `nbdev_test`, so CI ends with a countable summary.

Library notebooks are independent. Stage notebooks run as smoke tests in curriculum order (data →
tokenizer → midtrain) in one xdist group, sharing one output folder (`KAT_NB_OUT`), so each stage finds
what the previous one wrote and nothing touches the real data/ or models/.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBDEV_TEST = Path(sys.executable).with_name("nbdev_test")
LIB_NBS = sorted((ROOT/"nbs").glob("lib/*.ipynb")) + [ROOT/"nbs"/"index.ipynb"]
STAGE_NBS = sorted((ROOT/"nbs"/"stages").glob("[0-9][0-9]_*.ipynb"))


def _nbdev_test(nb: Path, env: dict | None = None, timeout: int = 900):
    r = subprocess.run([str(NBDEV_TEST), "--path", str(nb), "--n_workers", "0"], cwd=ROOT, env={**os.environ, **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "Failed" not in r.stderr, f"{nb.relative_to(ROOT)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


@pytest.mark.parametrize("nb", LIB_NBS, ids=lambda p: p.name)
def test_library_notebook(nb):
    _nbdev_test(nb)


@pytest.fixture(scope="module")
def stage_out(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.mark.xdist_group("stages")
@pytest.mark.parametrize("nb", STAGE_NBS, ids=lambda p: p.name)
def test_stage_notebook(nb, stage_out):
    _nbdev_test(nb, env={"KAT_NB_OUT": str(stage_out)})
