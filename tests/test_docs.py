"""The documentation site: `make docs` builds it offline (kat_nb.site), and headless Chromium opens every page
(kat_nb.browser). The same check must fail on a copy of the site broken on purpose, one fault of each kind.

Without a Chromium these tests skip on a developer's machine and FAIL in CI (`CI` set): `.ci/run` installs
Debian's `chromium`, so a skip there would hide a broken install step.
"""
import os, re, shutil
from pathlib import Path
import nbformat, pytest

from kat_nb.browser import check_site, chromium_path, expected_figures
from kat_nb.site import build_site, front_matter

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("docs")   # one worker builds the site once for the module


def _need_chromium():
    if chromium_path(): return
    why = "no Chromium (apt-get install chromium, or set KAT_NB_CHROMIUM)"
    if os.environ.get("CI"): pytest.fail(f"{why}: .ci/run installs it, so CI must not skip the docs browser test")
    pytest.skip(why)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(ROOT, out=tmp_path_factory.mktemp("site")/"_docs", quarto=False)


def _page(nb_path: Path) -> str:
    "The page nbdev names for a notebook: its folder + the front matter's output-file (number prefix dropped)."
    stem = re.sub(r"^\d+[a-z]?_", "", nb_path.stem)
    return f"{nb_path.parent.name}/{stem}.html"


def test_every_notebook_has_a_page(site):
    nbs = [p for d in ("lib", "stages", "results", "guides") for p in sorted((ROOT/"nbs"/d).glob("*.ipynb"))]
    missing = [_page(p) for p in nbs if not (site/_page(p)).exists()]
    assert not missing, f"notebooks without a page: {missing}"
    assert (site/"index.html").exists() and (site/"search.html").exists() and (site/"searchindex.js").exists()
    # a stage page carries its parameters with their documentation and its DVC stanza
    sft = re.sub(r"<[^>]+>", "", (site/"stages"/"sft.html").read_text())   # the page's text
    assert "sft.max_steps" in sft and "cmd: kat-nb run sft" in sft and "What it reads and writes" in sft
    # the API reference as nbdev renders it: show_doc's entry with its docments
    assert "inject_bug" in (site/"lib"/"bugs.html").read_text()
    # nothing is fetched from a CDN
    for p in site.rglob("*.html"):
        assert not re.search(r"""(src|href)=["']https?://[^"']*\.(js|css)""", p.read_text()), f"{p} loads a remote asset"


def test_site_passes_the_browser_check(site, tmp_path):
    _need_chromium()
    shots = tmp_path/"screens"
    figs = expected_figures(ROOT)
    assert figs.get("results/results.html", 0) >= 3
    r = check_site(site, screenshots=shots, expect_figures=figs)
    assert r["pages"] >= 40 and not r["problems"], "\n".join(r["problems"])
    assert {"home", "lib", "stages", "results", "guides", "search"} <= set(r["screenshots"])
    assert all(Path(p).stat().st_size > 5000 for p in r["screenshots"].values())
    # a copy for a person to look at (make docs-check writes the same)
    keep = ROOT/"build"/"docs-screens"; keep.mkdir(parents=True, exist_ok=True)
    for p in shots.glob("*.png"): shutil.copy(p, keep/p.name)


def test_the_check_fails_on_a_broken_site(site, tmp_path):
    _need_chromium()
    broken = tmp_path/"broken"
    shutil.copytree(site, broken)
    (broken/"lib"/"bugs.html").unlink()                                        # a page that does not exist
    results = (broken/"results"/"results.html").read_text()
    img = re.findall(r'<img[^>]+src="([^"]+)"', results)[0]
    (broken/"results"/img).unlink()                                             # a figure that is gone
    sft = broken/"stages"/"sft.html"
    sft.write_text(sft.read_text().replace("</body>", '<script>throw new Error("broken on purpose")</script>'
                                                      '<script src="https://cdn.example.org/x.js"></script></body>'))
    (broken/"searchindex.js").write_text('Search.setIndex({"docnames":[],"filenames":[],"terms":{},"titles":[],'
                                         '"titleterms":{},"objects":{},"objnames":{},"objtypes":{},"indexentries":{},"alltitles":{},"envversion":{}})')
    r = check_site(broken, expect_figures=expected_figures(ROOT))
    probs = "\n".join(r["problems"])
    assert re.search(r"^index.html: broken link [^\n]*lib/bugs.html", probs, re.M), probs
    assert re.search(rf"^results/results.html: broken image [^\n]*{re.escape(Path(img).name)}", probs, re.M), probs
    assert re.search(r"^results/results.html: \d+ figures shown, \d+ expected", probs, re.M), probs
    assert re.search(r"^stages/sft.html: script error: [^\n]*broken on purpose", probs, re.M), probs
    assert re.search(r"^stages/sft.html: request leaves the machine: https://cdn.example.org/x.js", probs, re.M), probs
    assert re.search(r"^search.html: searching for 'run_sft' finds nothing", probs, re.M), probs
