import pandas as pd

from rlvr import plots
from tests.conftest import ROOT


def test_dvc_yaml_plots_are_parsed():
    specs = plots.plot_specs(ROOT / "dvc.yaml")
    files = {f for s in specs for f in s.files}
    assert {"metrics/train_curve.csv", "metrics/passk/arith.csv", "metrics/prof_keep.csv"} <= files
    reward = next(s for s in specs if s.title == "training reward")
    assert reward.x == "step" and "reward" in dict(reward.series)["metrics/train_curve.csv"]
    heldout = next(s for s in specs if s.title == "held-out pass@1 during training")
    assert heldout.files == ("metrics/train_curve.csv", "metrics/heldout_curve.csv")
    assert heldout.x_label and heldout.y_label


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


def test_a_plot_over_two_files_draws_both_on_one_axes(in_tmp, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (in_tmp / "dvc.yaml").write_text(
        "plots:\n  - both:\n      x: step\n      x_label: optimizer step\n      y_label: fraction\n      y:\n"
        "        a.csv: [reward]\n        b.csv: [pass_at_1, greedy]\n")
    pd.DataFrame({"step": [1, 2, 3], "reward": [0.1, 0.2, 0.4]}).to_csv("a.csv", index=False)
    pd.DataFrame({"step": [0, 3], "pass_at_1": [0.3, 0.35], "greedy": [0.4, 0.5]}).to_csv("b.csv", index=False)
    drawn = {}
    saved = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn.update(labels=[line.get_label() for line in ax.get_lines()], x=ax.get_xlabel(), y=ax.get_ylabel())
        return saved(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    out = in_tmp / "out"
    out.mkdir()
    assert [p.name for p in plots.render_for(["b.csv"], out, in_tmp / "dvc.yaml")] == ["both.png"]
    assert drawn == {"labels": ["a: reward", "b: pass_at_1", "b: greedy"], "x": "optimizer step", "y": "fraction"}
