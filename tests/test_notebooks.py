"""Every notebook under nbs/ runs as one pytest test through `nbdev_test`, so CI ends with a countable summary.

Library notebooks are independent: one test each. Stage notebooks run as smoke tests in curriculum order
(data → tokenizer → midtrain → sft → eval → report) inside one test, sharing one output folder
(`KAT_NB_OUT`), so each stage finds what the previous one wrote and nothing touches the real data/ or models/.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBDEV_TEST = Path(sys.executable).with_name("nbdev_test")
# library notebooks, the docs' Results and guide notebooks (they read committed files), and the README's source
LIB_NBS = sorted((ROOT/"nbs").glob("lib/*.ipynb")) + sorted((ROOT/"nbs").glob("results/*.ipynb")) + \
          sorted((ROOT/"nbs").glob("guides/*.ipynb")) + [ROOT/"nbs"/"index.ipynb"]
STAGE_NBS = sorted((ROOT/"nbs"/"stages").glob("[0-9][0-9]_*.ipynb"))


def _nbdev_test(nb: Path, env: dict | None = None, timeout: int = 900):
    r = subprocess.run([str(NBDEV_TEST), "--path", str(nb), "--n_workers", "0"], cwd=ROOT, env={**os.environ, **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "Failed" not in r.stderr, f"{nb.relative_to(ROOT)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


@pytest.mark.parametrize("nb", LIB_NBS, ids=lambda p: p.name)
def test_library_notebook(nb):
    _nbdev_test(nb)


def test_stage_notebooks_in_curriculum_order(tmp_path):
    """The stage notebooks as smoke tests, in curriculum order, sharing one output folder (`KAT_NB_OUT`): each
    stage reads what the previous ones wrote, so they run as one test (pytest-xdist may not split or reorder
    them); the failure message names the notebook."""
    assert STAGE_NBS, "no stage notebooks found"
    for nb in STAGE_NBS: _nbdev_test(nb, env={"KAT_NB_OUT": str(tmp_path)})
