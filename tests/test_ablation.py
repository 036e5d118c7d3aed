"""Ablation settings map onto the config switches; runs are cached; summaries are the hand-computed numbers."""

import json
import statistics

import matplotlib
import pytest

matplotlib.use("Agg")

import hpkit.pipeline.train  # noqa: E402
from hpkit.lessons import ablation as ab  # noqa: E402
from hpkit.pipeline.config import get_config, override  # noqa: E402
from hpkit.lessons.workspace import notebook_config  # noqa: E402

SMALL = {"model.backbone": "random_tiny", "data.image_size": 32, "data.val_size": 32, "data.num_train": 8,
         "data.num_val": 2, "data.batch_size": 4, "model.dim": 16, "loss.pool_size": 8, "train.epochs": 1,
         "train.val_every": 0, "train.cache_features": False, "loss.warmup": 0, "loss.renew_interval": 1}


def _switches(row: str) -> tuple:
    loss = override(get_config("demo"), ab.TABLE4[row].overrides).loss
    return loss.task_specific, loss.lhp, loss.symmetric, loss.regularizer, loss.plain_contrastive


def test_table4_rows_map_onto_the_loss_switches():
    # (TS, LHP, symmetric, Reg, plain Eq. 1) per row, as in the paper's check marks.
    assert {r: _switches(r) for r in "abcdefg"} == {
        "a": (True, True, True, True, False), "b": (True, False, True, True, False),
        "c": (False, True, True, True, False), "d": (False, False, True, True, False),
        "e": (True, True, False, True, False), "f": (True, True, True, False, False),
        "g": (True, True, True, True, True)}  # (g): Eq. 1 replaces the whole HP objective in training
    for key, row in ab.TABLE4.items():
        c = row.components
        if key != "g":
            assert c["TA"] and (c["TS"], c["LHP"], c["SA"], c["Reg"]) == _switches(key)[:4]
    assert ab.TABLE4["a"].paper == {"cluster_accuracy": 57.2, "cluster_miou": 24.6}
    assert ab.TABLE4["g"].paper == {"cluster_accuracy": 37.8, "cluster_miou": 10.4}
    assert [override(get_config("demo"), r.overrides).loss.propagation for r in ab.TABLE5.values()] == ["gradient",
                                                                                                         "loss"]


def test_specs_name_every_row_and_seed():
    specs = ab.table4_specs([0, 1], "ab")
    assert specs == [("(a) full HP", {}, 0), ("(a) full HP", {}, 1), ("(b) no LHP", {"loss.lhp": False}, 0),
                     ("(b) no LHP", {"loss.lhp": False}, 1)]
    assert ab.sweep_specs("loss.tau", [0.3, 0.6], [5]) == [("loss.tau=0.3", {"loss.tau": 0.3}, 5),
                                                           ("loss.tau=0.6", {"loss.tau": 0.6}, 5)]
    assert [s[0] for s in ab.table5_specs([0])] == ["gradient propagation", "loss propagation"]
    with pytest.raises(ValueError, match="unknown Table 4 rows"):
        ab.table4_specs([0], "az")


def test_summarize_mean_and_spread_by_hand():
    rows = [{"name": "x", "seed": 0, "cluster_accuracy": 0.5}, {"name": "x", "seed": 1, "cluster_accuracy": 0.7},
            {"name": "x", "seed": 2, "cluster_accuracy": 0.9}, {"name": "y", "seed": 0, "cluster_accuracy": 0.4}]
    x, y = ab.summarize(rows, keys=["cluster_accuracy"])
    assert (x["name"], x["n"], x["seeds"]) == ("x", 3, [0, 1, 2])
    assert x["cluster_accuracy"] == pytest.approx(0.7)
    assert x["cluster_accuracy_std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert (x["cluster_accuracy_min"], x["cluster_accuracy_max"]) == (0.5, 0.9)
    assert (y["n"], y["cluster_accuracy"], y["cluster_accuracy_std"]) == (1, 0.4, 0.0)
    table = ab.markdown_table([x, y], {"name": "row", "n": "n", "cluster_accuracy": "Acc"},
                              percent=["cluster_accuracy"], paper={"x": {"cluster_accuracy": 57.2}})
    assert table.splitlines() == ["| row | n | Acc | paper Acc |", "|---|---|---|---|",
                                  "| x | 3 | 70.0 ± 20.0 | 57.2 |", "| y | 1 | 40.0 | - |"]


def test_runner_trains_once_then_reuses(tmp_path, monkeypatch):
    calls = []
    real = hpkit.pipeline.train.train

    def counting(cfg, out, **kwargs):
        calls.append((cfg.loss.lhp, cfg.train.seed, kwargs["max_steps"]))
        return real(cfg, out, **kwargs)

    monkeypatch.setattr(hpkit.pipeline.train, "train", counting)
    base = notebook_config(overrides=SMALL)
    specs = ab.table4_specs([0, 1], "ab") + [("again (a)", {}, 0)]  # same config as (a) seed 0: one run
    first = ab.run_ablation(base, specs, max_steps=2, max_images=2, workspace=tmp_path, verbose=False)
    assert sorted(calls) == [(False, 0, 2), (False, 1, 2), (True, 0, 2), (True, 1, 2)]
    assert [r["cached"] for r in first] == [False, False, False, False, True]
    assert first[4]["run"] == first[0]["run"] and first[0]["run"] != first[1]["run"]
    for r in first:
        assert r["steps"] == 2 and r["images"] == 2 and r["seconds_per_step"] > 0
        assert all(0 <= r[m] <= 1 for m in ab.METRICS)
        history = json.loads((tmp_path / r["run"].split("/")[-1] / "history.json").read_text())["steps"]
        assert r["seconds_per_step"] == history[1]["seconds"]  # median of the steps after the first
    again = ab.run_ablation(base, specs, max_steps=2, max_images=2, workspace=tmp_path, verbose=False)
    assert len(calls) == 4 and all(r["cached"] for r in again)
    assert [{k: v for k, v in r.items() if k != "cached"} for r in again] == \
        [{k: v for k, v in r.items() if k != "cached"} for r in first]
    summary = ab.summarize(first[:4])
    a = summary[0]
    assert a["name"] == "(a) full HP" and a["n"] == 2
    assert a["cluster_miou"] == pytest.approx(statistics.fmean([first[0]["cluster_miou"], first[1]["cluster_miou"]]))
    assert len(ab.plot_table4(summary).axes) == 2


def test_sweep_plot_reads_the_values_from_the_names():
    summary = ab.summarize([{"name": f"loss.tau={t}", "seed": s, "cluster_accuracy": t + s / 10,
                             "cluster_miou": t / 2} for t in (0.3, 0.6) for s in (0, 1)])
    fig = ab.plot_sweep(summary, "loss.tau", default=0.6)
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [0.3, 0.6] and list(y) == pytest.approx([35.0, 65.0])
    with pytest.raises(ValueError, match="loss.pool_size"):
        ab.plot_sweep(summary, "loss.pool_size")


def test_step_cost_is_measured_and_cached(tmp_path):
    cfg = notebook_config(overrides=SMALL)
    cost = ab.step_cost(cfg, steps=2, workspace=tmp_path)
    assert cost["memory_kind"] == "cpu_peak_rss_growth" and cost["steps"] == 2
    assert cost["seconds_per_step"] > 0 and cost["memory_mb"] >= 0
    assert ab.step_cost(cfg, steps=2, workspace=tmp_path) == cost  # from the cache file
    assert len(list((tmp_path / "costs").glob("*.json"))) == 1
    with pytest.raises(ValueError, match="at least 2"):
        ab.step_cost(cfg, steps=1, workspace=tmp_path)


def test_size_overrides_make_the_schedule_fit_the_steps():
    knobs = ab.size_overrides(steps=32, num_train=64, image_size=64, batch_size=8, num_val=16, pool_size=32)
    assert knobs == {"train.val_every": 0, "train.cache_features": False, "data.image_size": 64, "data.val_size": 64,
                     "data.batch_size": 8, "data.num_val": 16, "loss.pool_size": 32, "data.num_train": 64,
                     "train.epochs": 4, "loss.warmup": 8, "loss.renew_interval": 4}
    assert ab.size_overrides() == {"train.val_every": 0, "train.cache_features": False}
    with pytest.raises(ValueError, match="larger than num_train"):
        ab.size_overrides(num_train=16, pool_size=32)


def test_claims_use_the_papers_relative_gains():
    rows = [{"name": ab.TABLE4[k].name, "seed": s, "cluster_accuracy": v + d}
            for k, v in (("a", 0.50), ("d", 0.40), ("e", 0.52)) for s, d in ((0, -0.01), (1, 0.01))]
    claims = {c["claim"]: c for c in ab.compare_claims(ab.summarize(rows, keys=["cluster_accuracy"]))}
    assert set(claims) == {"(a) vs (d)", "(a) vs (e)"}  # the others need rows that did not run
    ad, ae = claims["(a) vs (d)"], claims["(a) vs (e)"]
    assert ad["paper_gain"] == pytest.approx(100 * (57.2 / 49.3 - 1))  # the paper's "16 %"
    assert ad["ours_gain"] == pytest.approx(25.0) and ad["difference"] == pytest.approx(10.0)
    assert ad["spread"] == pytest.approx(100 * (2 * 0.01 ** 2 * 2) ** 0.5)  # std of each row is sqrt(2) * 0.01
    assert ad["verdict"] == "agrees"
    assert ae["difference"] == pytest.approx(-2.0) and ae["verdict"] == "within the spread"
