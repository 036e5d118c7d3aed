"""The command line: train a tiny run, evaluate it as JSON, and report bad input without a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32", "data.num_train=24",
        "data.num_val=4", "data.batch_size=4", "model.dim=16", "loss.pool_size=16", "train.epochs=1"]


def hpkit(*args):
    return subprocess.run([sys.executable, "-m", "hpkit", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow
def test_train_then_eval_json(tmp_path):
    sets = [x for item in TINY for x in ("--set", item)]
    result = hpkit("train", "--preset", "demo", *sets, "--set", "train.val_every=2", "--set", "loss.warmup=1",
                   "--out", str(tmp_path), "--max-steps", "3")
    assert result.returncode == 0, result.stderr
    assert "trained 3 steps" in result.stdout and (tmp_path / "checkpoint.pt").is_file()
    history = json.loads((tmp_path / "history.json").read_text())
    v = history["validation"][0]  # step 2's validation, printed as one line with the same figures
    assert v["step"] == 2 and (f"step 2: validation cluster accuracy {100 * v['cluster_accuracy']:.1f} "
                               f"mIoU {100 * v['cluster_miou']:.1f}") in result.stdout
    ramp = [line for line in result.stdout.splitlines() if "lambda starts to rise" in line]
    assert len(ramp) == 1 and ramp[0].startswith("step 3:")  # warmup 1: steps 1 and 2 train with lambda 0
    assert result.stdout.strip().splitlines()[-1] == f"next: hpkit eval {tmp_path} --plots"
    assert [h["lambda"] for h in history["steps"]][:2] == [0.0, 0.0]
    result = hpkit("eval", str(tmp_path), "--json", "--plots")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["images"] == 4 and 0 <= metrics["cluster"]["pixel_accuracy"] <= 1
    assert metrics["config"]["data"]["num_train"] == 24 and metrics["step"] == 3  # the resolved config travels
    assert metrics["backbone"] == "random_tiny"
    for name in ("history.png", "confusion_cluster.png", "confusion_linear.png"):
        assert (tmp_path / name).stat().st_size > 1000
    result = hpkit("eval", str(tmp_path))
    assert "cluster -> class: 0->" in result.stdout


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    result = hpkit("train", "--preset", "demo", "--set", "loss.temperature=1", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown config key 'loss.temperature'" in result.stderr
    assert "Traceback" not in result.stderr
    result = hpkit("eval", str(tmp_path / "missing"))
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def test_every_command_has_help(capsys):
    from hpkit.__main__ import main

    for command in ("train", "eval", "segment", "prepare", "download", "quickstart"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and f"usage: hpkit {command}" in capsys.readouterr().out


def test_help_and_argument_errors_do_not_import_torch():
    """``--help`` and a bad argument answer before torch, timm or matplotlib are imported."""
    code = ("import sys; from hpkit.__main__ import main\n"
            "for argv in (['--help'], ['train']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'timm', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "the following arguments are required: --out" in result.stderr
