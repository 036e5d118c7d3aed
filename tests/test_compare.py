"""Before/after examples and run comparisons: the numbers agree with hpkit.pipeline.evaluate on the same images."""

import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from hpkit.lessons.compare import HP, HP_CRF, KMEANS, example_segmentations, format_table, metrics_table, plot_runs  # noqa: E402
from hpkit.pipeline.crf import crf_available  # noqa: E402
from hpkit.pipeline.evaluate import evaluate  # noqa: E402

@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_examples_match_evaluate(run):
    result = evaluate(run, max_images=6, batch_size=4)
    ex = example_segmentations(run, [0, 5], fit_images=6, crf=crf_available(), batch_size=4)
    assert ex.indices == [0, 5] and ex.fit_images == 6
    assert ex.images.shape == (2, 32, 32, 3) and ex.images.dtype == np.uint8
    assert ex.labels.shape == (2, 32, 32)
    for method in (KMEANS, HP):
        assert ex.predictions[method].shape == (2, 32, 32)
        assert set(np.unique(ex.predictions[method])) <= set(range(len(ex.class_names)))
    # same features, k-means seed and matching as evaluate(): the same accuracies
    assert ex.metrics[HP]["pixel_accuracy"] == pytest.approx(result["cluster"]["pixel_accuracy"])
    assert ex.metrics[KMEANS]["pixel_accuracy"] == pytest.approx(result["kmeans_backbone"]["pixel_accuracy"])
    assert list(ex.panels(1)) == ["ground truth", *ex.predictions]
    np.testing.assert_array_equal(ex.panels(1)["ground truth"], ex.labels[1])
    if crf_available():
        assert ex.predictions[HP_CRF].shape == (2, 32, 32)


def test_examples_without_crf_and_bad_indices(run):
    ex = example_segmentations(run, [1], fit_images=2, batch_size=4)
    assert HP_CRF not in ex.predictions and ex.fit_images == 2
    with pytest.raises(IndexError, match="out of range"):
        example_segmentations(run, [6], fit_images=2)


def test_table_and_curves(run):
    a = {"cluster": {"pixel_accuracy": 0.5, "mean_iou": 0.25}, "kmeans_backbone": {"pixel_accuracy": 0.4,
                                                                                  "mean_iou": 0.2}, "images": 6}
    b = {"cluster": {"pixel_accuracy": 0.6, "mean_iou": 0.3}, "images": 6}
    rows = metrics_table({"paper": a, "official": b})
    assert [(r["run"], r["method"]) for r in rows] == [("paper", "kmeans_backbone"), ("paper", "cluster"),
                                                       ("official", "cluster")]
    assert rows[1]["miou"] == pytest.approx(25.0)
    text = format_table(rows)
    assert "official" in text and "30.0" in text
    history = json.loads((run / "history.json").read_text())
    fig = plot_runs({"paper": run, "copy": history})
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].lines[0].get_ydata().tolist() == [
        e["loss"] for e in history["steps"]]
    with pytest.raises(FileNotFoundError):
        plot_runs({"missing": run / "nothing"})
