"""Plots show the numbers they are given (checked on the figure's data, not on pixels)."""

import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from hpkit.lessons.plots import colorize, legend_handles, plot_confusion, plot_history, plot_segmentation  # noqa: E402


def test_history_plot_from_a_run_folder(tmp_path):
    history = {"steps": [{"step": i, "loss": 5.0 - i, "lambda": i / 4, "probe_loss": 0.0} for i in range(1, 5)],
               "validation": [{"step": 2, "cluster_accuracy": 0.5, "cluster_miou": 0.25, "linear_accuracy": 0.6,
                               "linear_miou": 0.3}]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    fig = plot_history(tmp_path)
    loss_ax, val_ax = fig.axes[0], fig.axes[1]
    assert loss_ax.lines[0].get_ydata().tolist() == [4.0, 3.0, 2.0, 1.0]
    assert [line.get_ydata().tolist() for line in val_ax.lines][0] == [25.0]  # cluster mIoU in %
    with pytest.raises(FileNotFoundError, match="no training history"):
        plot_history(tmp_path / "missing")


def test_confusion_plot_normalises_columns():
    confusion = [[8, 1], [2, 3]]
    fig = plot_confusion(confusion, ["a", "b"])
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, [[0.8, 0.25], [0.2, 0.75]])
    with pytest.raises(ValueError, match=r"confusion must be \(K, 3\)"):
        plot_confusion(confusion, ["a", "b", "c"])


def test_colorize_legend_and_segmentation_figure():
    colors = [[255, 0, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [-1, 1]])
    np.testing.assert_array_equal(colorize(labels, colors),
                                  [[[255, 0, 0], [0, 0, 255]], [[0, 0, 0], [0, 0, 255]]])
    handles = legend_handles(["sky", "sea"], colors, mapping=[1, 0, -1])
    assert [h.get_label() for h in handles] == ["cluster 0 -> sea", "cluster 1 -> sky", "cluster 2 -> ?"]
    fig = plot_segmentation(np.zeros((2, 2, 3)), {"truth": labels}, ["sky", "sea"], colors, title="t")
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), colorize(labels, colors))
