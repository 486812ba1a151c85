import pandas as pd

from rlvr import plots
from tests.conftest import ROOT


def test_dvc_yaml_plots_are_parsed():
    specs = plots.plot_specs(ROOT / "dvc.yaml")
    files = {s.file for s in specs}
    assert {"metrics/train_curve.csv", "metrics/passk/arith.csv", "metrics/prof_keep.csv"} <= files
    reward = next(s for s in specs if s.title == "training reward")
    assert reward.x == "step" and "reward" in reward.ys


def test_render_draws_present_columns_and_skips_missing_data(in_tmp):
    (in_tmp / "dvc.yaml").write_text(
        "plots:\n  - curve:\n      x: step\n      y:\n        c.csv: [reward, missing]\n"
        "  - absent:\n      x: step\n      y:\n        nothere.csv: [reward]\n"
        "  - wrong x:\n      x: epoch\n      y:\n        c.csv: [reward]\n")
    pd.DataFrame({"step": [1, 2, 3], "reward": [0.1, 0.2, 0.4]}).to_csv("c.csv", index=False)
    out = in_tmp / "out"
    out.mkdir()
    written = plots.render_for(["c.csv", "nothere.csv"], out, in_tmp / "dvc.yaml")
    assert [p.name for p in written] == ["curve.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[0].stat().st_size > 1000
    assert plots.render_for(["other.csv"], out, in_tmp / "dvc.yaml") == []
