"""The notebooks as a user meets them: JupyterLab in a real browser (headless Chromium driven by
playwright), every cell run from the Run menu with the `ci` parameters, no error or stderr output,
and the record browser widget rendered and live (picking another record redraws it from the kernel).

Needs Debian's `chromium` (/usr/bin/chromium, or $FLUXLAB_CHROMIUM) and the `playwright` Python
package (its own browsers are not used); `.ci/run` installs both. Without them the tests skip and
say what is missing. $FLUXLAB_BROWSER_NOTEBOOKS (comma-separated) picks the notebooks to open.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from fluxlab import notebook

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FLUXLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOKS = [n for n in os.environ.get("FLUXLAB_BROWSER_NOTEBOOKS", ",".join(notebook.NOTEBOOKS)).split(",") if n]
RUN_TIMEOUT_S = 300   # one notebook, all cells (the ci presets take well under a minute each)
START_TIMEOUT_S = 90  # JupyterLab up and the notebook open with its kernel idle

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does), or set "
                f"FLUXLAB_CHROMIUM", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the playwright Python package is not installed: pip install playwright (.ci/run does; "
                "its own browser download is not needed)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over the papermill-prepared (ci parameters injected) notebooks."""
    work = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        notebook.prepare_copy(name, "ci", work / f"{name}.ipynb")
    settings = work / ".settings"
    # Every cell in the DOM (JupyterLab 4 otherwise renders only the visible ones) and no
    # announcement pop-ups: what the test reads is the whole notebook.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(work / ".ws"),
           "JUPYTER_RUNTIME_DIR": str(work / ".runtime"), "FLUXLAB_STORE": str(work / "store.db"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not notebook.gpu_ids():
        env.setdefault("TRITON_INTERPRET", "1")
    log = open(work / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {(work / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"url": url, "token": token, "work": work}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _wait_for_kernel(lab, name: str) -> None:
    """Until the server says this notebook's kernel is idle with the page connected to it (the
    page's own indicator says idle before the kernel exists, and Run All then runs nothing)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
            kernels = [s["kernel"] for s in json.load(r) if s.get("path") == f"{name}.ipynb"]
        if any(k.get("execution_state") == "idle" and k.get("connections", 0) >= 1 for k in kernels):
            return
        assert time.monotonic() < deadline, f"{name}: no idle, connected kernel after {START_TIMEOUT_S}s: {kernels}"
        time.sleep(0.5)


# Prompts of code cells: "[ ]" not run, "[*]" running or queued, "[12]" done.
_PROMPTS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim())"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab_in_a_real_browser(lab, browser, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        # A workspace of its own, reset: only this notebook open (the server remembers the others).
        page.goto(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={lab['token']}",
                  timeout=START_TIMEOUT_S * 1000)
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=START_TIMEOUT_S * 1000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=START_TIMEOUT_S * 1000)
        _wait_for_kernel(lab, name)
        n_code = sum(c.cell_type == "code" for c in nbformat.read(lab["work"] / f"{name}.ipynb", 4).cells)
        # Cells attach progressively; all of them must be in the DOM before anything is read.
        page.wait_for_function(f"() => ({_PROMPTS})().length === {n_code}", timeout=START_TIMEOUT_S * 1000)

        # Run > Run All Cells, as a user would; then wait for the first cell to leave "[ ]".
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
        page.wait_for_function(f"() => ({_PROMPTS})()[0] !== '[ ]:'", timeout=START_TIMEOUT_S * 1000)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            prompts = page.evaluate(_PROMPTS)
            busy = any("*" in p for p in prompts)
            if not busy and page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
                break
            assert time.monotonic() < deadline, f"{name}: still running after {RUN_TIMEOUT_S}s: {prompts}"
            time.sleep(1.0)

        # Every code cell ran (a failing cell stops Run All, leaving the rest unnumbered).
        prompts = page.evaluate(_PROMPTS)
        unrun = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:?", p)]
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        texts = [errors.nth(i).inner_text()[:500] for i in range(errors.count())]
        assert not texts, f"{name}: error or stderr output in the browser:\n" + "\n---\n".join(texts)
        assert not unrun, f"{name}: code cells {unrun} did not run: {prompts}"

        # The record browser rendered as a live widget, not as its text fallback.
        assert page.locator("text=Error displaying widget").count() == 0
        dropdown = page.locator(".jupyter-widgets.widget-dropdown select").first
        dropdown.wait_for(timeout=30_000)
        options = dropdown.locator("option").all_inner_texts()
        assert options, f"{name}: the record browser has no records"
        out = page.locator(".jupyter-widgets.widget-output").first.element_handle()
        shows = "([el, text]) => el.innerText.includes(text)"  # the table names the record's benchmark
        page.wait_for_function(shows, arg=[out, options[0].split()[0]], timeout=30_000)
        if len(options) > 1:  # a live widget: the kernel redraws the table for the chosen record
            dropdown.select_option(index=len(options) - 1)
            page.wait_for_function(shows, arg=[out, options[-1].split()[0]], timeout=30_000)
        assert not page_errors, f"{name}: JavaScript errors: {page_errors}"
    finally:
        page.close()
