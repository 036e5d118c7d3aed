"""Notebook 02's explorer, used as a person uses it: JupyterLab on localhost, headless Chromium.

Starts ``jupyter lab`` on a free port, opens ``notebooks/02_global_hidden_positives.ipynb`` in
Debian's Chromium (Playwright with ``executable_path``: no browser download), runs all cells, moves
the anchor-column slider with the keyboard and checks that the positives figure and the status line
change, then clicks a patch on the explorer's picture and checks that the anchor moved to it. Needs ``playwright`` (the ``dev`` extra) and a Chromium binary (``apt-get install chromium``;
``.ci/run`` installs it); skipped where either is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("HPKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = "notebooks/02_global_hidden_positives.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab server on localhost serving the repository; yields its base URL and token."""
    port, token = _free_port(), "hpkit-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}", "--LabApp.expose_app_in_browser=True",
         "--allow-root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    committed = (REPO / NOTEBOOK).read_bytes()  # JupyterLab autosaves outputs into the file: put it back after
    try:
        for _ in range(120):
            if server.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start; log:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        (REPO / NOTEBOOK).write_bytes(committed)


@pytest.mark.slow
def test_clicking_an_anchor_changes_the_positives(lab, tmp_path):
    base, token = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
        page.wait_for_function("window.jupyterapp !== undefined && document.querySelector('.jp-Notebook') !== null",
                               timeout=120_000)
        # Wait for the kernel, then run every cell (the same command as Run > Run All Cells).
        page.wait_for_function(
            "(() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle'; })()", timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        status = page.locator(".hp-status").first
        status.wait_for(state="visible", timeout=300_000)
        figure = page.locator(".hp-figure").first  # an ipywidgets Image: the <img> itself
        figure.wait_for(state="visible", timeout=300_000)
        status.scroll_into_view_if_needed()
        before_text = status.inner_text()
        before_png = figure.screenshot()

        # Move the anchor one patch to the right: focus the column slider's handle, press ArrowRight.
        handle = page.locator(".hp-anchor-col .noUi-handle").first
        handle.click()
        handle.press("ArrowRight")
        handle.press("ArrowRight")
        page.wait_for_function(
            "(before) => { const s = document.querySelector('.hp-status'); return s && s.innerText !== before; }",
            arg=before_text, timeout=120_000)
        page.wait_for_timeout(3000)  # the figure is redrawn after the status line
        after_text = status.inner_text()
        after_png = figure.screenshot()
        # Now click a patch on the picture: near the left edge, low in the image.
        grid = [int(float(page.locator(f".hp-anchor-{axis} .noUi-handle").first.get_attribute("aria-valuemax"))) + 1
                for axis in ("row", "col")]
        fx, fy = 0.1, 0.85
        want = f"anchor ({int(fy * grid[0])}, {int(fx * grid[1])})"
        assert want not in after_text
        pick = page.locator(".hp-pick").first
        pick.scroll_into_view_if_needed()
        box = pick.bounding_box()
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        page.wait_for_function(
            "(want) => { const s = document.querySelector('.hp-status'); return s && s.innerText.includes(want); }",
            arg=want, timeout=120_000)
        clicked_text = status.inner_text()
        (tmp_path / "before.png").write_bytes(before_png)
        (tmp_path / "after.png").write_bytes(after_png)
        browser.close()
    assert after_text != before_text
    assert after_png != before_png, "the positives figure did not change when the anchor moved"
    assert want in clicked_text and clicked_text != after_text  # the click moved the anchor to the clicked patch
