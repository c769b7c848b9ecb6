"""Quiet runs: what a command prints is what the user needs (no torchvision fallback notes, config
warnings as one line without Python's source echo)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code_or_args, home, **kw):
    env = {**os.environ, "FLUXLAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, **kw)


def test_loading_a_pipeline_prints_no_torchvision_fallback_note(home, pipe):
    proc = _run(["-c", "from fluxlab import models; models.load_pipeline('tiny', 'cpu'); print('ok')"], home)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "torchvision" not in proc.stderr, proc.stderr[-2000:]


def test_config_warnings_are_one_plain_line(home, tmp_path):
    proc = _run(["-m", "fluxlab", "train", "configs/tiny.yaml", "--set", "steps=1", "--set", "lr_warmup_steps=50",
                 "--set", f"data={tmp_path / 'missing'}", "--set", f"output_dir={tmp_path / 'out'}"], home)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0] == ("fluxlab: warning: lr_warmup_steps (50) > steps (1): the learning rate never reaches "
                        "learning_rate"), lines
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert len(lines) == 2 and lines[1].startswith("fluxlab: error: dataset folder")


def _notebook(path: Path, mark: Path) -> Path:
    """A two-cell notebook whose kernel writes `mark` if it ever receives SIGINT after its cells."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    probe = (f"import signal\nmark = {str(mark)!r}\n"
             "def _hit(*_):\n    open(mark, 'w').write('SIGINT')\n"
             "get_ipython().kernel.post_handler_hook = lambda: signal.signal(signal.SIGINT, _hit)\n"
             "print('ran')")
    nb.cells = [nbformat.v4.new_code_cell(probe)]
    nbformat.write(nb, str(path))
    return path


def test_notebook_runs_print_no_kernel_transport_warning_and_send_no_sigint(tmp_path):
    import papermill

    quiet_mark, stock_mark = tmp_path / "quiet.mark", tmp_path / "stock.mark"
    code = ("import sys\nfrom pathlib import Path\nfrom fluxlab import notebook\n"
            f"ok, err = notebook.execute(Path({str(_notebook(tmp_path / 'q.ipynb', quiet_mark))!r}), "
            f"Path({str(tmp_path / 'q_out.ipynb')!r}), {{}}, run_id='r', preset='ci')\n"
            "assert ok, err\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "without encryption" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert "ran" in (tmp_path / "q_out.ipynb").read_text()
    assert not quiet_mark.exists()                     # shut down without an interrupt
    assert not list(tmp_path.glob("*ipc*"))            # no socket files left in the working directory
    # Control: jupyter_client's stock manager does interrupt on shutdown, so the probe can see it.
    papermill.execute_notebook(str(_notebook(tmp_path / "s.ipynb", stock_mark)), str(tmp_path / "s_out.ipynb"),
                               kernel_name="python3", progress_bar=False)
    assert stock_mark.read_text() == "SIGINT"


def test_use_kernels_warns_on_the_cpu_only_without_the_interpreter(monkeypatch):
    import warnings

    from fluxlab.config import ConfigWarning, TrainConfig

    for value, warned in (("1", False), ("", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TrainConfig(device="cpu", use_kernels=True)
        hits = [w for w in caught if issubclass(w.category, ConfigWarning)]
        assert bool(hits) == warned, (value, [str(w.message) for w in caught])
        assert all("TRITON_INTERPRET=1" in str(w.message) for w in hits)
