"""Plots a reader understands: every figure the package draws passes `figure_problems` (title,
axis labels, no offset notation, tick labels >= 7 pt); the checker itself catches the old faults."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from fluxlab import gradflow, memory  # noqa: E402
from fluxlab.inference import min_samples, summarize_latency  # noqa: E402
from fluxlab.plots import figure_problems  # noqa: E402

MiB = 2**20


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _cpu_samples(n=8):
    # ~176 MiB with sub-MiB wiggles: exactly what made matplotlib print "+1.763e2".
    return [{"step": i, "rss": int((176.3 + 0.01 * i) * MiB), "heap": int((60.0 + 0.002 * (i % 3)) * MiB),
             "tensors": int((12.0 + 0.001 * i) * MiB)} for i in range(n)]


def test_checker_catches_offset_notation_missing_labels_and_tiny_ticks():
    fig, ax = plt.subplots()
    ax.plot(np.arange(8), [s["rss"] / MiB for s in _cpu_samples()])
    ax.tick_params(labelsize=5)
    problems = "\n".join(figure_problems(fig))
    assert "offset notation" in problems and "no y label" in problems and "no title" in problems
    assert "5 pt" in problems


def test_memory_trace_panels_have_units_titles_and_plain_numbers():
    fig = memory.plot_trace(_cpu_samples(), warmup=3)
    assert figure_problems(fig) == []
    assert len(fig.axes) == 3 and all(ax.get_ylabel() == "MiB" for ax in fig.axes)


def test_memory_stage_bars_are_readable():
    prof = memory.StageProfile(stages=[memory.Stage("setup", 100 * MiB, 900 * MiB, 950 * MiB, True),
                                       memory.Stage("steps", 900 * MiB, 901 * MiB, 1200 * MiB, True)])
    assert figure_problems(memory.plot_stages(prof)) == []


def _tracker(n_blocks=11, steps=5):
    """A model with FLUX-like names: 4 LoRA layers per block, lora_B zero at first."""
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList(
        torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4), "to_k": torch.nn.Linear(4, 4)}) for _ in range(n_blocks))
    tr = gradflow.GradFlowTracker(model)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for i, block in enumerate(model.transformer_blocks):
            for name, lin in block.items():
                lin.weight.grad = torch.randn(4, 4, generator=g) * 10.0 ** (-(i % 4))
                lin.bias.grad = torch.zeros(4)
        model.transformer_blocks[0].to_k.weight.grad = model.transformer_blocks[0].to_k.bias.grad = None
        model.transformer_blocks[1].to_q.weight.grad.zero_()   # an exactly-zero layer
        tr.record(step)
    return tr


def test_gradient_heatmap_groups_blocks_explains_zero_cells_and_uses_a_log_scale():
    tr = _tracker()
    assert len(tr.layers) == 22  # beyond the 7-pt rows a notebook-width figure holds readably
    ax = tr.heatmap(group="block")
    fig = ax.figure
    assert figure_problems(fig) == []
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"double {i}" for i in range(11)]
    assert isinstance(ax.images[0].norm, LogNorm)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "exactly 0" in legend and "no gradient" in legend


def test_gradient_heatmap_layer_rows_are_readable_and_zero_cells_are_painted():
    tr = _tracker(n_blocks=3)
    ax = tr.heatmap()  # auto: 12 layers -> one row per layer
    assert figure_problems(ax.figure) == []
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "double 1 to_q" in labels
    zero_row = labels.index("double 1 to_q")
    special = ax.images[1].get_array()     # 0 = exactly zero (grey), 1 = no gradient (red)
    assert (special[zero_row] == 0).all()
    assert (special[labels.index("double 0 to_k")] == 1).all()          # no .grad at any step
    assert special.mask[labels.index("double 2 to_q")].all()            # ordinary cells: colour scale only


@pytest.mark.parametrize("n,shown", [(6, ["p50"]), (20, ["p50", "p90", "p95"]), (1000, ["p50", "p90", "p95", "p99", "p99.9"])])
def test_latency_shows_only_the_percentiles_n_supports(n, shown):
    rep = summarize_latency(np.random.default_rng(0).lognormal(0, 0.1, n))
    assert list(rep.supported_percentiles_s()) == shown
    assert {k.removesuffix("_s") for k in rep.metrics() if k.startswith("p") and k.endswith("_s")} == set(shown)
    ax = rep.plot()
    assert figure_problems(ax.figure) == []
    lines = [t.get_text() for t in ax.get_legend().get_texts() if t.get_text().startswith("p")]
    assert [t.split()[0] for t in lines] == shown
    assert f"n={n}" in ax.get_title()


def test_min_samples_rule():
    assert [min_samples(q) for q in (50, 90, 95, 99, 99.9)] == [2, 10, 20, 100, 1000]
