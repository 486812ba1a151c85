"""The plots page `dvc plots show` writes: every plot is a deliberate dvc.yaml definition, DVC reports
no warning, and in a real browser with no network every plot draws (tests/browser.py).

The page is rendered in a temporary DVC project from the repo's dvc.yaml, .dvc/config, the vendored
template and the committed metrics, with train_curve.csv rewritten by the train stage's own writer
(stages.train.curve_csv) for a GAIN-RL run (mu logged) and for a uniform run (mu blank).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rlvr import plots
from stages import train
from tests.browser import Browser, chromium_path
from tests.conftest import ROOT, real_params_dict, small_params_dict

DVC = [sys.executable, "-m", "dvc"]
TEMPLATE = ROOT / "vendor" / "vega" / "plots_template.html"

# Per plot div: the rendered chart (vega draws on a <canvas class="marks"> or an <svg class="marks">),
# its size and how many pixels are not background. An empty spec draws a 0x0 canvas.
INK = """Array.from(document.querySelectorAll('body > div[id]')).map(d => {
  const c = d.querySelector('canvas.marks, svg.marks');
  if (!c) return {id: d.id, kind: null, width: 0, height: 0, ink: 0};
  if (c.tagName.toLowerCase() === 'svg')
    return {id: d.id, kind: 'svg', width: c.clientWidth, height: c.clientHeight,
            ink: c.querySelectorAll('path, line, text').length};
  if (!c.width || !c.height) return {id: d.id, kind: 'canvas', width: 0, height: 0, ink: 0};
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 0; i < px.length; i += 4)
    if (px[i + 3] > 0 && (px[i] < 200 || px[i + 1] < 200 || px[i + 2] < 200)) ink++;
  return {id: d.id, kind: 'canvas', width: c.width, height: c.height, ink: ink};
})"""


def plots_project(root: Path, order: str) -> Path:
    """A DVC project (no git) holding the repo's plot definitions, template and committed metrics,
    with train_curve.csv as the train stage writes it for `order` ('gain_rl': mu logged)."""
    root.mkdir()
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(ROOT / "vendor", root / "vendor")
    shutil.copytree(ROOT / "metrics", root / "metrics")
    # Only the top-level plots: the stages' deps are not in this project.
    definitions = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": definitions}, sort_keys=False))
    rows = pd.read_csv(ROOT / "metrics" / "train_curve.csv").drop(columns=["gain_rl/mu"], errors="ignore")
    records = rows.to_dict("records")
    if order == "gain_rl":
        for i, row in enumerate(records):
            row["gain_rl/mu"] = 10.0 + 5.0 * i
    (root / "metrics" / "train_curve.csv").write_text(train.curve_csv(records))
    return root


def show(project: Path) -> tuple[Path, str]:
    """`dvc plots show` into project/dvc_plots; returns the page and DVC's stderr."""
    done = subprocess.run([*DVC, "plots", "show", "-o", "dvc_plots"], cwd=project, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stderr
    return project / "dvc_plots" / "index.html", done.stderr


def specs_in(page: Path) -> dict[str, dict]:
    """The vega-lite spec DVC embedded for each plot div, by div id."""
    html = page.read_text()
    specs = {}
    for chunk in html.split('<div id = "')[1:]:
        div_id = chunk.split('"', 1)[0]
        spec_text = chunk.split("var spec = ", 1)[1].split(";\n", 1)[0]
        specs[div_id] = json.loads(spec_text)
    return specs


def test_the_template_carries_the_chart_library_and_no_remote_script():
    html = TEMPLATE.read_text()
    assert "{plot_divs}" in html and "{scripts}" not in html  # DVC's CDN <script> tags never go in
    assert "<script src" not in html and "sourceMappingURL" not in html
    for name in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {name}." in html
    assert (ROOT / "vendor" / "vega" / "LICENSE").read_text().count("BSD-3-Clause") >= 3
    assert "html_template = ../vendor/vega/plots_template.html" in (ROOT / ".dvc" / "config").read_text()


def test_every_plot_is_a_top_level_definition_with_named_axes():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert "plots" not in stage, f"stage {name}: stage-level plots draw DVC's default index charts"
    specs = plots.plot_specs(ROOT / "dvc.yaml")
    assert specs
    for spec in specs:
        assert spec.x_label and spec.y_label, spec.title
    # pass@k is drawn for benchmarks the evaluate stage writes (a missing file is a DVC error), in the
    # committed params and in the small ones the pipeline tests run.
    passk = {Path(f).stem for s in specs for f in s.files if f.startswith("metrics/passk/")}
    assert passk and passk <= set(real_params_dict()["evaluate"]["benchmarks"])
    assert passk <= set(small_params_dict()["evaluate"]["benchmarks"])


def test_train_curve_always_has_the_mu_column():
    text = train.curve_csv([{"step": 1, "reward": 0.5}])
    assert text.splitlines()[1].endswith(",NaN")  # not blank: vega-lite would draw a blank cell as 0
    blank = pd.read_csv(io.StringIO(text))
    assert list(blank.columns) == ["step", "reward", "gain_rl/mu"] and blank["gain_rl/mu"].isna().all()
    assert train.curve_csv([]) == "step,gain_rl/mu\n"
    logged = train.curve_csv([{"step": 1, "reward": 0.5, "gain_rl/mu": 3.0}])
    assert pd.read_csv(io.StringIO(logged))["gain_rl/mu"].tolist() == [3.0]


@pytest.mark.parametrize("order", ["gain_rl", "uniform"])
def test_dvc_plots_show_has_no_warning_and_an_inline_library(tmp_path, order):
    page, stderr = show(plots_project(tmp_path / "project", order))
    assert "WARNING" not in stderr and "failed" not in stderr.lower(), stderr
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "<script src" not in html
    specs = specs_in(page)
    assert len(specs) == len(plots.plot_specs(ROOT / "dvc.yaml"))
    assert all(spec.get("data", {}).get("values") for spec in specs.values())  # no empty `{}` spec
    mu = {row["gain_rl/mu"] for row in specs["gain-rl_mu"]["data"]["values"]}
    assert (mu == {"NaN"}) == (order != "gain_rl")  # NaN: vega-lite leaves the point out (no line at 0)


@pytest.mark.slow
def test_plots_page_draws_every_plot_offline_in_chromium(tmp_path):
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page, _ = show(plots_project(tmp_path / "project", "gain_rl"))
    n_plots = len(specs_in(page))
    start = time.monotonic()
    with Browser(offline=True) as browser:
        visit = browser.visit(page.as_uri(), ready=f"document.querySelectorAll('.marks').length >= {n_plots}",
                              evaluate={"charts": INK}, screenshot=tmp_path / "plots.png")
    seconds = time.monotonic() - start
    assert visit.ready, f"not every plot drew within the timeout: {visit.errors}"
    assert visit.errors == []
    assert visit.outside == [] and visit.requests == [page.as_uri()]  # nothing left the page
    charts = visit.values["charts"]
    assert len(charts) == n_plots
    for chart in charts:
        # Axes, labels and lines: a chart with data has thousands of inked pixels, an empty one none.
        assert chart["kind"] and chart["width"] > 200 and chart["height"] > 200 and chart["ink"] > 1000, chart
    assert (tmp_path / "plots.png").stat().st_size > 10_000
    print(f"chromium: {n_plots} plots drew offline in {seconds:.1f} s")
