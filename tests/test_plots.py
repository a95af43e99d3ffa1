"""The figures follow the rules a reviewer checks: linear axes unless the values span more than ~1.5
decades, every drawn line or marker in the legend, no line joining runs of different protocols or
settings, bars from zero (or the share of the gap closed), a title naming model, data and protocol,
integer layer ticks, labels from the swept values."""

import pytest

import sppx.collect as collect


def row(run, sparsity, final, pruned=40.0, dense=25.0, windows=32, adapter="spp", lr=0.03, **extra):
    return {
        "run": run,
        "status": "complete",
        "model": "tiny",
        "data": "wiki",
        "windows": windows,
        "seqlen": 64,
        "steps": 30,
        "pruner": "wanda",
        "pattern": "unstructured",
        "kind": "unstructured",
        "adapter": adapter,
        "teacher": "none",
        "lr": lr,
        "target": sparsity,
        "sparsity": sparsity,
        "ppl_final": final,
        "ppl_pruned": pruned,
        "ppl_dense": dense,
        **extra,
    }


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, kept open for inspection."""
    kept = []
    monkeypatch.setattr(collect, "_save", lambda fig, path: kept.append(fig))
    return kept


def legend_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_lines_join_only_comparable_runs_and_every_artist_is_in_the_legend(figures, tmp_path):
    rows = [
        row("a", 0.5, 30.0),
        row("b", 0.6, 33.0),
        row("c", 0.5, 31.0, windows=16),  # another protocol: never on the same line
        row("d", 0.6, 34.0, windows=16),
        row("e", 0.5, 29.0, lr=0.01),  # another lr at a sparsity already drawn: its own series
    ]
    assert collect.plot_ppl_vs_sparsity(rows, tmp_path / "x.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"  # 25..40 is a narrow range
    assert "tiny on wiki" in ax.get_title()
    finals = [line for line in ax.get_lines() if line.get_marker() == "o"]
    # a/b share everything but the sparsity; c/d another protocol; e alone.
    assert sorted(len(line.get_xdata()) for line in finals) == [1, 2, 2]
    labels = legend_labels(ax)
    for line in ax.get_lines():
        assert line.get_label() in labels, line.get_label()
    assert any(label.startswith("dense") for label in labels)
    assert any("after pruning" in label for label in labels)


def test_a_wide_range_gets_a_log_axis(figures, tmp_path):
    rows = [row("a", 0.5, 30.0, pruned=60.0), row("b", 0.9, 3000.0, pruned=9000.0)]
    collect.plot_ppl_vs_sparsity(rows, tmp_path / "x.png")
    assert figures[0].axes[0].get_yscale() == "log"


def test_recovery_bars_start_at_zero_or_show_the_gap_closed(figures, tmp_path):
    narrow = [row("sparsity=0.5", 0.5, 30.0, pruned=40.0), row("sparsity=0.6", 0.6, 33.0, pruned=45.0)]
    assert collect.plot_recovery(narrow, tmp_path / "x.png", params=["sparsity"])
    ax = figures[-1].axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sparsity=0.5000", "sparsity=0.6000"]
    wide = [row("a", 0.5, 30.0, pruned=40.0), row("b", 0.9, 300.0, pruned=9000.0)]
    collect.plot_recovery(wide, tmp_path / "y.png")
    ax = figures[-1].axes[0]
    assert ax.get_xscale() == "linear" and "gap closed" in ax.get_xlabel()
    widths = sorted(round(p.get_width(), 1) for p in ax.patches)
    assert widths == [66.7, 96.9]  # (pruned - final) / (pruned - dense), in %


def test_layer_ticks_are_integers(figures, tmp_path):
    rows = [row("a", 0.5, 30.0)]
    results = [{"sparsity": {"per_layer": [0.5, 0.5, 0.5]}}]
    assert collect.plot_layer_sparsity(rows, results, tmp_path / "x.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert ax.get_title()
