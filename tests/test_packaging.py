"""The project's install story stays single-sourced: pyproject.toml, environment.yml, README, .ci/run."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_command(heading: str) -> str:
    """The first line of the first bash block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")][0].strip()


def test_environment_yml_is_a_thin_wrapper_over_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d for d in deps if isinstance(d, dict))["pip"]
    assert pip == ["-e .[dev]"]  # nothing else: every dependency lives in pyproject.toml


def test_pyproject_pins_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "pydensecrf2==1.1"):
        assert pin in deps
    for name in ("timm", "numpy", "scipy", "matplotlib", "pillow", "tqdm", "ipywidgets", "jupyterlab",
                 "safetensors"):
        assert any(d.split("=")[0].split(">")[0] == name for d in deps), name
    for name in ("pytest", "nbmake", "papermill", "ipykernel"):
        assert any(d.startswith(name) for d in project["optional-dependencies"]["dev"]), name
    assert project["requires-python"] == ">=3.10"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_command("Set up") in ci
    assert readme_command("Tests") in ci


def test_quickstart_command_runs(tmp_path):
    cmd = readme_command("Quickstart").split()
    assert cmd[:3] == ["python", "-m", "hpkit"]
    env = {"HPKIT_WEIGHTS": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, *cmd[1:], "--backbone", "random_tiny"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "objective (paper style)" in result.stdout and "objective (official style)" in result.stdout
    assert "gradient reached the segmentation head" in result.stdout


def test_readme_library_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## The library in one picture", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["loss"].dim() == 0 and scope["loss"].item() > 0
    assert scope["head"].linear.weight.grad is not None
    assert scope["pools"].specific.shape == (32, 64)
