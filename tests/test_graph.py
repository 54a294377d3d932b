"""The computational graph: DOT structure, edge numbers that add up, Graphviz rendering."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy as sp
from conftest import need

import symbp as sb
from symbp.errors import SymbpError
from symbp.printing import graph
from symbp.printing.graph import render, to_dot

w, x, b, t, y = sp.symbols("w x b t y", real=True)
N = sp.Symbol("N")

# name -> (f, at): scalar graphs whose edge gradients are checked against sb.compile
SCALAR = {
    "sum": (x + y, {"x": 2.0, "y": 3.0}),
    "product": (x * y, {"x": -1.5, "y": 4.0}),
    "neuron": ((sb.sigmoid(w * x + b) - t) ** 2 / 2, {"w": 0.5, "x": 1.0, "b": 0.1, "t": 1.0}),
    "shared": (x * x + sp.exp(x) * w, {"x": 0.3, "w": -2.0}),
    "chain": (sp.sin(x**2), {"x": 0.7}),
}

_EDGE = re.compile(r"^\s*(\w+) -> (\w+) \[label=<(.*)>\];$")
_RED = re.compile(r'<font color="red">([^<]*)</font>')


def _edges(dot):
    out = []
    for line in dot.splitlines():
        m = _EDGE.match(line)
        if m:
            red = _RED.search(m.group(3))
            out.append((m.group(1), m.group(2), float(red.group(1)) if red else None))
    return out


def test_sum_graph_is_the_textbook_figure():
    x_, y_ = sp.symbols("x y")
    dot = to_dot(x_ + y_, loss="p")
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert 'label="+"' in dot and 'label="p"' in dot
    edges = [ln for ln in dot.splitlines() if "->" in ln and "style=invis" not in ln]
    assert len(edges) == 3  # x → +, y → +, + → p


@pytest.mark.parametrize("name", SCALAR)
def test_edge_gradients_add_up_to_the_compiled_gradient(name):
    f, at = SCALAR[name]
    wrt = sorted(f.free_symbols, key=str)
    dot = to_dot(f, at=at, wrt=wrt, digits=15)
    _, grads = sb.compile(f, wrt)(**at)
    ids = {m.group(2): m.group(1) for m in re.finditer(r'(in\d+) \[shape=plaintext, '
                                                         r'label=["<](\w+)', dot)}
    edges = _edges(dot)
    for s in wrt:
        total = sum(g for src, _, g in edges if src == ids[s.name])
        assert total == pytest.approx(float(grads[s.name]), rel=1e-9, abs=1e-12), (s, dot)
    # every value edge also carries its forward value
    assert all(g is not None for src, _, g in edges if src.startswith("op"))


def test_matrix_graph_shows_shapes_and_values(rng):
    X = sp.MatrixSymbol("X", N, 3)
    W = sp.MatrixSymbol("W", 3, 2)
    T = sp.MatrixSymbol("T", N, 2)
    f = sb.softmax_cross_entropy(X * W, T)
    at = {"X": rng.normal(size=(4, 3)), "W": rng.normal(size=(3, 2)),
          "T": np.eye(2)[[0, 1, 1, 0]]}
    dot = to_dot(f, at=at, wrt=[W])
    assert "N×3" in dot and 'label="@"' in dot and "CE∘softmax" in dot
    _, grads = sb.compile(f, [W])(**at)
    # W is small: its edge shows the whole gradient matrix
    wid = re.search(r'(in\d+) \[shape=plaintext, label="W', dot).group(1)
    wline = [ln for ln in dot.splitlines() if ln.strip().startswith(f"{wid} ->")][0]
    assert f"{grads['W'][0, 0]:.4g}" in wline


@pytest.mark.parametrize("name", ["neuron", "shared"])
def test_graphviz_renders_svg_and_png(tmp_path, name):
    need(shutil.which("dot") is not None, "graphviz")
    f, at = SCALAR[name]
    dot = to_dot(f, at=at)
    svg = render(dot, tmp_path / "g.svg")
    png = render(dot, tmp_path / "g.png")
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and "<svg" in svg.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_missing_graphviz_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    with pytest.raises(SymbpError, match=r"apt-get install graphviz.*to_dot\(\.\.\.\)"):
        render(to_dot(x + y), tmp_path / "g.svg")


def test_bad_output_suffix(tmp_path):
    with pytest.raises(SymbpError, match=r"\.svg, \.png or \.pdf"):
        render(to_dot(x + y), tmp_path / "g.jpg")


def test_dot_errors_are_reported(tmp_path):
    need(shutil.which("dot") is not None, "graphviz")
    with pytest.raises(SymbpError, match="dot failed"):
        render("digraph { a -> }", tmp_path / "g.svg")


# --- a picture for a slide: legend, size, input order, sums at a fan-out -------------------


def _layout(dot):
    """Graphviz's layout of DOT source: {node id: (x, y)} in inches, y pointing up."""
    out = subprocess.run([shutil.which("dot"), "-Tplain"], input=dot.encode(),
                         capture_output=True, check=True).stdout.decode()
    return {p[1]: (float(p[2]), float(p[3])) for p in (ln.split() for ln in out.splitlines())
            if p and p[0] == "node"}


def test_legend_says_black_is_value_and_red_is_gradient():
    dot = to_dot(x + y, at={"x": 2.0, "y": 3.0}, loss="p")
    assert re.search(r'label=<black: value \(forward\).*<font color="red">red: gradient '
                     r"∂⁺p/∂· \(backward\)</font>>", dot), dot
    assert "black: value" not in to_dot(x + y)  # no numbers, nothing to explain


@pytest.mark.parametrize("f, order", [(x + y, "xy"), (y + x, "xy"), (x * w + b, "xwb"),
                                      (x * w + b, "bwx")])
def test_inputs_stand_top_to_bottom_in_the_given_order(f, order):
    need(shutil.which("dot") is not None, "graphviz")
    dot = to_dot(f, at={s.name: 1.0 for s in f.free_symbols}, order=list(order))
    ids = dict(re.findall(r'(in\d+) \[shape=plaintext, label=["<](\w+)', dot))
    pos = _layout(dot)
    heights = [pos[i][1] for i in sorted(ids, key=lambda i: order.index(ids[i]))]
    assert heights == sorted(heights, reverse=True), (order, ids, pos)
    assert len({round(pos[i][0], 3) for i in ids}) == 1  # one column


def test_default_order_follows_wrt():
    dot = to_dot(x + y, wrt=[y, x])
    assert re.search(r'in0 \[shape=plaintext, label="y"', dot), dot


def test_png_is_slide_sized(tmp_path):
    need(shutil.which("dot") is not None, "graphviz")
    from matplotlib.image import imread

    png = render(to_dot(x + y, at={"x": 2.0, "y": 3.0}, loss="p"), tmp_path / "p.png")
    assert imread(png).shape[1] >= 1000


def test_fan_out_shows_the_summed_gradient():
    f, at = SCALAR["shared"]  # x feeds x² and exp(x)
    dot = to_dot(f, at=at, digits=15)
    _, grads = sb.compile(f, [x, w])(**at)
    node = re.search(r'in\d+ \[shape=plaintext, label=<x<br/><font color="red">Σ = ([^<]+)'
                     r"</font>>", dot)
    assert node, dot
    assert float(node.group(1)) == pytest.approx(float(grads["x"]), rel=1e-9)
    assert dot.count("Σ = ") == 1  # w feeds one operation: its edge says it all
    # an operation's value used twice gets its sum beside the node
    z = sp.Symbol("z", real=True)
    inner = sp.sin(z)
    g = inner * inner + inner
    dot = to_dot(g, at={"z": 0.4}, digits=15)
    sums = re.findall(r'op\d+ \[shape=.*label=<\w+<br/><font color="red">Σ = ([^<]+)'
                      r"</font>>", dot)
    want = float(sp.diff(g.subs(inner, z), z).subs(z, sp.sin(0.4)))  # ∂(s² + s)/∂s
    assert [float(v) for v in sums] == pytest.approx([want], rel=1e-9), dot


def test_singular_point_edges_show_infinities_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dot = to_dot(sp.log(x) * y, at={"x": 0.0, "y": 1.0})
    ids = dict(re.findall(r'(in\d+) \[shape=plaintext, label=["<](\w+)', dot))
    inv = {v: k for k, v in ids.items()}
    # ∂(y log x)/∂x = y/x → +∞ at 0 (IEEE, as the gradient program), ∂/∂y = log 0 = −∞
    assert dot.count("∞") >= 2
    assert re.search(rf'{inv["x"]} -> op\d+ \[label=<x = 0<br/><font color="red">∞</font>',
                     dot), dot
