"""The pose editor in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

Chromium comes from the system (Debian's ``chromium`` package, which ``.ci/run`` installs); Playwright's own
browser download is never used. Skipped, with the reason, where either is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kpnb.core import files

pytestmark = pytest.mark.slow
CHROMIUM = next((p for p in (os.environ.get("KPNB_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; or set KPNB_CHROMIUM)",
                allow_module_level=True)

EDITOR_CELL = f'''
import numpy as np
import torch
from IPython.display import display
from kpnb.core.files import repo_root
from kpnb.core.settings import preset_config
from kpnb.diffusion import ldm, sampling
from kpnb.models import vq
from kpnb.poses.formats import read_pose_dir
from kpnb.run.widgets import PoseEditor

cfg = preset_config("smoke")
torch.manual_seed(0)
ae = vq.VQModel(vq.vq_config_for("f8", cfg["vq"])).eval()  # a tiny untrained model: the path, not the picture
model = ldm.ldm_from_settings(cfg["diffusion"], "skeleton", (4, 4, 4)).eval()
labels, poses = read_pose_dir({str(files.repo_root() / "data" / "poses")!r})
editor = PoseEditor(dict(zip(labels, poses)),
                    lambda pose: sampling.sample_images(model, ae, pose.to_array()[None], steps=2, seed=0))
display(editor.widget)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(EDITOR_CELL.strip())]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(tmp_path / "editor.ipynb"))
    port, token = _free_port(), "kpnb-test-token"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}",
                             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("JupyterLab did not start: " + proc.stdout.read1(20000).decode(errors="replace")
                                if proc.poll() is not None else "JupyterLab did not answer within 2 minutes")
                time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_pose_editor_in_chromium(lab, tmp_path):
    url, token = lab
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/editor.ipynb?token={token}", timeout=120_000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)  # the kernel is up
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.keyboard.press("Shift+Enter")  # run the cell as a person does
        button = page.locator("button", has_text="Generate")
        button.wait_for(timeout=180_000)
        images = page.locator(".widget-image")
        preview_before = images.first.get_attribute("src")
        assert preview_before and preview_before.startswith(("blob:", "data:"))
        handle = page.locator(".widget-hslider .noUi-handle, .widget-slider .noUi-handle").first
        handle.focus()
        for _ in range(20):  # the nose's x slider, 20 keyboard steps to the right: a drag, as a person does
            page.keyboard.press("ArrowRight")
        page.wait_for_function("([el, before]) => el.getAttribute('src') !== before",
                               arg=[images.first.element_handle(), preview_before], timeout=30_000)
        button.click()
        page.locator(".widget-html", has_text="1 sample(s)").wait_for(timeout=180_000)
        out_src = images.nth(1).get_attribute("src")
        assert out_src and out_src.startswith(("blob:", "data:"))
        page.screenshot(path=str(tmp_path / "pose_editor.png"), full_page=True)
        browser.close()
    assert (tmp_path / "pose_editor.png").stat().st_size > 10_000
