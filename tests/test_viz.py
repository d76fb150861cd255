"""Figures and HTML views: the numbers in them are the numbers given, colours and hovers as documented."""
import math

import pytest

from factorlab import viz

TOKENS = ["The", " cat", " sat", "\n"]
LAYERS = [0, 5]
TOP_K = {0: [[2, 0], [1, 2], [2, 1], [0, 1]], 5: [[3, 2], [3, 0], [0, 3], [1, 0]]}
PROBS = {layer: [[0.1, 0.2, 0.3, 0.4] for _ in TOKENS] for layer in LAYERS}


def test_expert_colors_are_distinct_for_any_n():
    for n in (2, 4, 10, 24, 64):
        colors = viz.expert_colors(n)
        assert len(colors) == n == len(set(colors))


def test_heatmap_top1_is_categorical_with_a_legend_and_full_hover():
    fig = viz.routing_heatmap(TOKENS, LAYERS, TOP_K, PROBS, num_experts=4)
    heat = fig.data[0]
    assert [list(row) for row in heat.z] == [[2, 1, 2, 0], [3, 3, 0, 1]]  # top-1 expert per layer row
    assert heat.zmin == -0.5 and heat.zmax == 3.5 and not heat.showscale
    scale_colors = [c for _, c in heat.colorscale]
    assert scale_colors[::2] == viz.expert_colors(4)  # one flat band per expert
    assert [t.name for t in fig.data[1:]] == [f"expert {e}" for e in range(4)]
    hover = heat.customdata[1][0]
    assert "'The'" in hover and "layer 5" in hover and "3 (0.40), 2 (0.30)" in hover
    assert list(fig.layout.xaxis.ticktext)[-1] == "⏎"  # a newline token stays visible


def test_heatmap_probability_view_uses_a_sequential_scale():
    fig = viz.routing_heatmap(TOKENS, LAYERS, TOP_K, PROBS, num_experts=4, expert=2)
    heat = fig.data[0]
    assert len(fig.data) == 1 and heat.zmin == 0 and heat.zmax == 1
    assert all(v == 0.3 for row in heat.z for v in row)
    assert "expert 2" in fig.layout.title.text


def test_load_figure_stacks_shares_per_layer():
    fig = viz.load_figure({0: [0.5, 0.25, 0.25, 0.0], 3: [0.25] * 4}, 4)
    assert fig.layout.barmode == "stack" and len(fig.data) == 4
    totals = [sum(trace.y[i] for trace in fig.data) for i in range(2)]
    assert totals == [1.0, 1.0]


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9)]
    assert viz.pareto_front(points) == [(1.0, 0.5), (2.0, 0.7), (4.0, 0.9)]


def test_tradeoff_figure_marks_dense_and_current_k():
    points = [{"label": "dense", "k": None, "gflops": 0.30, "score": 0.60, "stderr": 0.02},
              {"label": "K=1", "k": 1, "gflops": 0.20, "score": 0.40, "stderr": 0.02},
              {"label": "K=2", "k": 2, "gflops": 0.25, "score": 0.55, "stderr": None}]
    fig = viz.tradeoff_figure(points, current_k=2, metric="acc")
    names = [t.name for t in fig.data]
    assert names == ["Pareto front", "dense", "factorized (K experts)", "current K=2"]
    current = fig.data[-1]
    assert list(current.x) == [0.25] and current.marker.symbol == "star"
    assert list(fig.data[0].x) == [0.20, 0.25, 0.30]
    empty = viz.tradeoff_figure([], 1, "acc")
    assert "no stored results" in empty.layout.annotations[0].text


def test_flops_figure_stacks_to_the_totals():
    dense = {"attention_proj": 1e8, "attention_scores": 2e7, "ffn": 3e8, "router": 0.0, "lm_head": 5e7}
    half = {**dense, "ffn": 1.5e8, "router": 1e6}
    rows = {name: {**f, "total": sum(f.values())} for name, f in (("dense", dense), ("K=2", half))}
    fig = viz.flops_figure(rows, 512)
    for i, name in enumerate(rows):
        assert sum(trace.y[i] for trace in fig.data) == pytest.approx(rows[name]["total"] / 1e9)
    ratio = rows["K=2"]["total"] / rows["dense"]["total"]
    assert [a.text for a in fig.layout.annotations] == ["100% of dense", f"{ratio:.0%} of dense"]


def test_loss_figure_keeps_known_positive_losses():
    records = [{"step": 1, "losses": {"route": 0.5, "balance": 0.2, "label_accuracy": 0.9}},
               {"step": 2, "losses": {"distill": 1e-4, "distill_before": 0.3}},
               {"step": 3, "losses": {"route": math.nan, "kl": 0.0}}]
    fig = viz.loss_figure(records)
    series = {t.name: list(t.y) for t in fig.data}
    assert series == {"router loss (PAR)": [0.5], "balance loss": [0.2], "distillation MSE (after refit)": [1e-4],
                      "distillation MSE (before refit)": [0.3]}
    assert fig.layout.yaxis.type == "log"
    assert "losses appear here" in viz.loss_figure([]).layout.annotations[0].text


def test_progress_html_escapes_and_fills_the_bar():
    view = {"kind": "train", "name": "<script>x</script>", "state": "running", "phase": "train", "fraction": 0.25,
            "step_text": "1/4", "rate_text": "1,000", "elapsed_text": "3 s", "eta_text": "9 s", "message": "router",
            "error": None}
    out = viz.progress_html(view)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "width:25.0%" in out and "1/4" in out and "ETA" in out
    assert "No job yet" in viz.progress_html(None)
    failed = viz.progress_html({**view, "state": "failed", "fraction": None, "error": "disk <full>"})
    assert "fl-failed" in failed and "disk &lt;full&gt;" in failed


def test_tokens_html_colours_each_token_by_its_top1_expert():
    out = viz.tokens_html(["Hi", " <b>"], [{3: [1, 0]}, {3: [2, 1]}], layer=3, num_experts=4)
    colors = viz.expert_colors(4)
    assert out.count("class='fl-tok'") == 2 and colors[1] in out and colors[2] in out
    assert "&lt;b&gt;" in out and "experts 2, 1" in out
    assert viz.tokens_html([], [], 3, 4) == ""
