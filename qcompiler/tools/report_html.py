"""`report.html`: one self-contained page for a report (`qcompiler.tools.report/2`), viewable offline.

Everything is inline and drawn here: CSS, SVG charts, and one PNG (the heatmap, encoded here with
zlib) as a data URI. There is no script, no font, no stylesheet or image from anywhere else. Every
string that comes from the model or the pipeline (layer and node names, the pipeline, reasons) is
HTML-escaped.

Charts: bits per input channel as a heatmap (layers x channels, wide layers averaged into at most
`HEATMAP_COLUMNS` columns), each layer's output SQNR against the float model as bars, and the
model output's SQNR after each pass as a line. Tables: summary, layers, passes, float nodes.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import struct
import zlib
from typing import Any

import numpy as np

from qcompiler.tools.report_bits import FLOAT_BITS, FP16_BITS, decode_channel_bits

WIDTH = 960
HEATMAP_WIDTH = 720
HEATMAP_COLUMNS = HEATMAP_WIDTH  # one pixel per column at most: layers up to 720 channels are drawn exactly
HEATMAP_LABELS = 200
BAR_COLOR = (78, 121, 167)
EXACT_COLOR = (176, 200, 226)
LINE_COLOR = (225, 87, 89)
FLOAT_COLOR = (204, 204, 204)
AXIS_COLOR = "#555555"
# bits -> colour, interpolated on log2(bits): few bits warm, many bits cool, fp16 darkest
PALETTE = ((1, (103, 0, 31)), (2, (214, 47, 39)), (3, (244, 109, 67)), (4, (253, 174, 97)),
           (6, (171, 217, 233)), (8, (69, 117, 180)), (16, (40, 30, 110)))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def bits_color(bits: float | None) -> tuple[int, int, int]:
    """The heatmap colour of a (mean) bit width; None or float32 is grey."""
    if bits is None or not math.isfinite(bits) or bits >= FLOAT_BITS:
        return FLOAT_COLOR
    x = math.log2(max(1.0, min(float(bits), FP16_BITS)))
    for (b0, c0), (b1, c1) in itertools.pairwise(PALETTE):
        x0, x1 = math.log2(b0), math.log2(b1)
        if x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))
    return PALETTE[-1][1]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array [H, W, 3] as a PNG file (no filter, zlib level 9)."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3).astype(np.uint8)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= count:
            step *= m
            break
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


# ---------------------------------------------------------------------------------------------
# Charts


def _layer_row(layer: dict, columns: int) -> np.ndarray:
    """Mean bits per column for one layer (NaN: float)."""
    weight = layer.get("weight") or {}
    if weight.get("format") in ("float", "other") or weight.get("mean_bits") is None:
        return np.full(columns, np.nan)
    if weight.get("channel_bits"):
        bits = decode_channel_bits(weight["channel_bits"]).astype(np.float64)
        k = len(bits)
        if k >= columns:
            edges = (np.arange(columns + 1) * k) // columns
            sums = np.add.reduceat(bits, edges[:-1])
            return sums / np.diff(edges)
        return bits[(np.arange(columns) * k) // columns]
    return np.full(columns, float(weight["mean_bits"]))


def heatmap_svg(layers: list[dict]) -> str:
    rows = len(layers)
    if rows == 0:
        return '<p class="note">No layers with a constant weight.</p>'
    per_channel = any((layer.get("weight") or {}).get("channel_bits") for layer in layers)
    widest = max((layer.get("channels") or 1) for layer in layers)
    columns = max(1, min(HEATMAP_COLUMNS, widest)) if per_channel else 1
    matrix = np.stack([_layer_row(layer, columns) for layer in layers])
    row_h = int(max(2, min(16, 480 // rows)))
    height = rows * row_h
    values, inverse = np.unique(np.nan_to_num(matrix, nan=-1.0), return_inverse=True)
    table = np.array([bits_color(None if v < 0 else float(v)) for v in values], np.uint8)
    colours = table[inverse.reshape(matrix.shape)]
    image = colours[np.repeat(np.arange(rows), row_h)][:, (np.arange(HEATMAP_WIDTH) * columns) // HEATMAP_WIDTH]
    data = base64.b64encode(png(image)).decode("ascii")
    x0, top = HEATMAP_LABELS, 10
    parts = [(f'<svg id="heatmap" class="chart" viewBox="0 0 {WIDTH} {height + 90}" width="{WIDTH}" height="{height + 90}" '
             f'role="img" aria-label="bits per channel">')]
    parts.append(f'<image x="{x0}" y="{top}" width="{HEATMAP_WIDTH}" height="{height}" preserveAspectRatio="none" '
                 f'href="data:image/png;base64,{data}"/>')
    label_every = 1 if rows * 1 <= 48 and row_h >= 9 else max(1, math.ceil(rows / max(1, height // 12)))
    for r, layer in enumerate(layers):
        y = top + r * row_h
        weight = layer.get("weight") or {}
        hist = weight.get("bits_histogram") or {}
        detail = ", ".join(f"{k}: {v}" for k, v in hist.items()) or "float32"
        parts.append(f'<rect x="{x0}" y="{y}" width="{HEATMAP_WIDTH}" height="{row_h}" fill="transparent">'
                     f'<title>{_e(layer.get("name"))}: {_e(detail)}</title></rect>')
        if r % label_every == 0:
            text = str(layer.get("name")) if label_every == 1 else f"{r}"
            if len(text) > 30:
                text = "…" + text[-29:]
            parts.append(f'<text x="{x0 - 6}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" class="tick">{_e(text)}</text>')
    parts.append(f'<text x="{x0 + HEATMAP_WIDTH / 2}" y="{top + height + 18}" text-anchor="middle" class="axis">'
                 f'{"input channels, in the layer&#39;s order (wide layers averaged)" if per_channel else "one bit width per layer"}</text>')
    legend = [(b, bits_color(b), str(b) if b != FP16_BITS else "fp16") for b in (1, 2, 3, 4, 6, 8, FP16_BITS)]
    legend.append((FLOAT_BITS, FLOAT_COLOR, "float32"))
    x = x0
    for _, colour, label in legend:
        parts.append(f'<rect x="{x}" y="{top + height + 34}" width="22" height="14" fill="{_hex(colour)}"/>'
                     f'<text x="{x + 26}" y="{top + height + 45}" class="tick">{label}</text>')
        x += 80
    parts.append("</svg>")
    note = "" if per_channel else ('<p class="note">No per-channel bit allocation in this pipeline: each row shows its '
                                   "layer's weight bits (grey: float).</p>")
    return "".join(parts) + note


def _value_grid(lo: float, hi: float, left: float, right: float, y_of) -> list[str]:
    """Horizontal grid lines with their value labels, for a chart whose values run from lo to hi."""
    lines = []
    for t in _nice_ticks(lo, hi):
        y = y_of(t)
        lines.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(float(t), 1)}</text>')
    return lines


def error_bars_svg(layers: list[dict]) -> str:
    measured = [(i, layer) for i, layer in enumerate(layers) if layer.get("error")]
    if not measured:
        return '<p class="note">No per-layer error was measured.</p>'
    finite = [layer["error"]["sqnr_db"] for _, layer in measured if layer["error"].get("sqnr_db") is not None]
    hi = max(finite) * 1.1 if finite and max(finite) > 0 else 60.0
    lo = min(0.0, min(finite)) if finite else 0.0
    left, right, top, bottom, height = 56, 16, 14, 40, 260
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    n = len(layers)
    step = plot_w / n

    def y_of(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    parts = [(f'<svg id="errors" class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
             f'role="img" aria-label="per-layer output SQNR">')]
    parts.extend(_value_grid(lo, hi, left, right, y_of))
    gap = 1 if step > 3 else 0
    for i, layer in measured:
        err = layer["error"]
        v = err.get("sqnr_db")
        exact = v is None
        value = hi if exact else v
        y0, y1 = y_of(max(0.0, value)), y_of(min(0.0, value))
        colour = EXACT_COLOR if exact else BAR_COLOR
        tip = f"{layer.get('name')}: " + ("exact" if exact else f"SQNR {_fmt(v, 2)} dB") + f", cosine {_fmt(err.get('cosine'), 6)}"
        parts.append(f'<rect x="{left + i * step + gap / 2:.2f}" y="{y0:.2f}" width="{max(step - gap, 0.5):.2f}" '
                     f'height="{max(y1 - y0, 0.5):.2f}" fill="{_hex(colour)}"><title>{_e(tip)}</title></rect>')
    parts.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{y_of(0):.1f}" y2="{y_of(0):.1f}" stroke="{AXIS_COLOR}"/>')
    every = max(1, math.ceil(n / 24))
    for i in range(0, n, every):
        parts.append(f'<text x="{left + (i + 0.5) * step:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">{i}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" class="axis">layer (graph order)</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle" class="axis">output SQNR (dB)</text>')
    parts.append("</svg>")
    return "".join(parts)


def drift_svg(passes: list[dict]) -> str:
    points = [(i, p) for i, p in enumerate(passes) if p.get("drift")]
    if not points:
        return '<p class="note">Output drift was not measured (--no-drift).</p>'
    finite = [p["drift"]["sqnr_db"] for _, p in points if p["drift"].get("sqnr_db") is not None]
    hi = max(finite) * 1.15 if finite and max(finite) > 0 else 100.0
    lo = min(0.0, min(finite)) if finite else 0.0
    left, right, top, bottom, height = 96, 40, 14, 70, 280
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    n = len(passes)
    step = plot_w / max(1, n - 1) if n > 1 else 0.0

    def x_of(i: int) -> float:
        return left + (i * step if n > 1 else plot_w / 2)

    def y_of(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    parts = [(f'<svg id="drift" class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
             f'role="img" aria-label="output drift per pass">')]
    parts.extend(_value_grid(lo, hi, left, right, y_of))
    coords = []
    for i, p in points:
        v = p["drift"].get("sqnr_db")
        coords.append((x_of(i), y_of(hi if v is None else v), v is None, p))
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords)
    parts.append(f'<polyline points="{path}" fill="none" stroke="{_hex(LINE_COLOR)}" stroke-width="3"/>')
    for x, y, exact, p in coords:
        d = p["drift"]
        tip = f"{p.get('index')}. {p.get('name')}: " + ("exact" if exact else f"SQNR {_fmt(d.get('sqnr_db'), 2)} dB") + \
            f", cosine {_fmt(d.get('cosine'), 6)}, max |d| {_fmt(d.get('max_abs'), 3)}"
        fill = "#ffffff" if exact else _hex(LINE_COLOR)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{_hex(LINE_COLOR)}" stroke-width="2">'
                     f'<title>{_e(tip)}</title></circle>')
    for i, p in enumerate(passes):
        x = x_of(i)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" transform="rotate(-25 {x:.1f} {top + plot_h + 14})" '
                     f'text-anchor="end" class="tick">{_e(p.get("name"))}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle" class="axis">model output SQNR (dB)</text>')
    parts.append("</svg>")
    return "".join(parts) + '<p class="note">Hollow points: the output is still exact.</p>'


# ---------------------------------------------------------------------------------------------
# Tables and page


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td{" class=num" if i in numeric else ""}>{_e(_fmt(v) if not isinstance(v, str) else v)}</td>'
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _bits_text(weight: dict) -> str:
    hist = weight.get("bits_histogram")
    if weight.get("format") == "float":
        return "32 (float)"
    if not hist:
        return _fmt(weight.get("bits"))
    if len(hist) == 1:
        return next(iter(hist))
    return " ".join(f"{k}:{v}" for k, v in hist.items())


def _layer_rows(layers: list[dict]) -> list[list[Any]]:
    rows = []
    for layer in layers:
        w, a, s, err = layer.get("weight") or {}, layer.get("activation") or {}, layer.get("smooth"), layer.get("error") or {}
        outliers = []
        if w.get("fp16_channels"):
            outliers.append(f"{w['fp16_channels']} fp16 ch")
        if w.get("sparse_outliers"):
            outliers.append(f"{w['sparse_outliers']} sparse")
        act = a.get("format", "")
        if a.get("mode"):
            act += f" {a['mode']}"
        cosine = err.get("cosine")
        rows.append([
            layer.get("index"), layer.get("name"), layer.get("op"), "×".join(str(d) for d in layer.get("weight_shape") or []),
            w.get("format", ""), _bits_text(w), w.get("grid") or w.get("codebook") or "–", w.get("group_size"),
            None if s is None else s.get("alpha"), ", ".join(outliers) or "–", act, w.get("stored_bits_per_weight"),
            w.get("sqnr_db"), "exact" if err and err.get("sqnr_db") is None else err.get("sqnr_db"),
            _g(None if cosine is None else 1 - cosine),
        ])
    return rows


def _g(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _pass_rows(passes: list[dict]) -> list[list[Any]]:
    rows = []
    for p in passes:
        d = p.get("drift") or {}
        cosine = d.get("cosine")
        rows.append([p.get("index"), p.get("spec"), p.get("seconds"), bool(p.get("modified")), _g(d.get("max_abs")),
                     _g(d.get("rel_l2")), _g(None if cosine is None else 1 - cosine),
                     ("exact" if d and d.get("sqnr_db") is None else d.get("sqnr_db"))])
    return rows


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
code{font-size:12px;background:#f4f4f4;padding:1px 4px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:130px}
.card b{display:block;font-size:18px}.card span{font-size:12px;color:#666}
.chart{max-width:100%;height:auto;display:block}.chart .tick{font-size:11px;fill:#444}.chart .axis{font-size:12px;fill:#333}
.chart .grid{stroke:#eee}.note{font-size:12px;color:#666;margin:2px 0 8px}
table{border-collapse:collapse;font-size:12px;width:100%;margin:6px 0}th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f7f7f7;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee}
"""


def _quality_html(quality: dict | None) -> str:
    """The quality gates (`compile --fail-under/--fail-over`) and the evaluation they read, if any."""
    if not quality:
        return ""
    verdict = "passed" if quality.get("passed") else "FAILED"
    rows = [[g.get("metric"), g.get("direction"), g.get("threshold"), g.get("value"), "pass" if g.get("passed") else "FAIL"]
            for g in quality.get("gates") or []]
    evaluation = ", ".join(f"{k} {v}" for k, v in sorted((quality.get("evaluation") or {}).items()))
    return "".join([
        f"<h2>Quality gates: {_e(verdict)}</h2>",
        _table(["metric", "must be", "threshold", "value", ""], rows, numeric={2, 3}),
        f"<p class=note>evaluation: {_e(evaluation or 'probe batch only')}</p>",
    ])


def render(report: dict) -> str:
    """The page for a report dict (as `qcompiler.tools.report.build` returns or JSON loads)."""
    manifest = report.get("manifest") or {}
    source = manifest.get("source") or {}
    size = report.get("size") or {}
    summary = report.get("summary") or {}
    layers = report.get("layers") or []
    passes = report.get("passes") or []
    float_nodes = report.get("float_nodes") or []
    output = summary.get("output") or {}
    title = f"qcompiler report: {source.get('name', 'model')}"
    cards = [
        ("float weights", f"{_fmt((size.get('float_weight_bytes') or 0) / 1e6, 2)} MB"),
        ("artifact weights", f"{_fmt((size.get('artifact_weight_bytes') or 0) / 1e6, 2)} MB"),
        ("effective bits / weight", _fmt(size.get("effective_bits_per_weight"), 3)),
        ("layers quantized", f"{summary.get('layers_quantized', 0)} / {summary.get('layers', 0)}"),
        ("output SQNR", "exact" if output and output.get("sqnr_db") is None else f"{_fmt(output.get('sqnr_db'), 2)} dB"),
        ("output cosine", _fmt(output.get("cosine"), 6)),
        ("lowest layer SQNR", f"{_fmt(summary.get('lowest_layer_sqnr_db'), 2)} dB"),
    ]
    card_html = "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards)
    probe = report.get("probe") or {}
    probe_text = ", ".join(f"{name} {'×'.join(map(str, p.get('shape', [])))}" for name, p in (probe.get("inputs") or {}).items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>pipeline <code>{_e(manifest.get('pipeline', ''))}</code></p>",
        (f"<p class=note>schema {_e(report.get('schema', ''))}; source {_e(source.get('kind', ''))} "
        f"sha256 {_e(str(source.get('sha256', ''))[:16])}…; probe batch {_e(probe_text or '–')}; "
        f"layer references taken after <code>{_e(probe.get('layer_reference', ''))}</code>; "
        f"measured on {_e(probe.get('source') or '–')}{_e(': ' + probe['note'] if probe.get('note') else '')}</p>"),
        "".join(f"<p class=note><b>warning</b>: {_e(w)}</p>" for w in report.get("warnings") or []),
        f"<div class=cards>{card_html}</div>",
        _quality_html(report.get("quality")),
        "<h2>Bits per input channel</h2>",
        heatmap_svg(layers),
        "<h2>Layer output error against the float model</h2>",
        ('<p class="note">SQNR of each layer\'s output on the probe batch, in the emitted model, against the same layer '
        "in the float model. Errors accumulate along the graph: a layer's number includes what the layers before it "
        "lost. Pale bars: exact.</p>"),
        error_bars_svg(layers),
        "<h2>Output drift per pass</h2>",
        drift_svg(passes),
        "<h2>Layers</h2>",
        '<div class="scroll">',
        _table(["#", "layer", "op", "weight", "format", "bits", "grid", "group", "alpha", "outliers", "activation",
                "stored bits/w", "weight SQNR dB", "output SQNR dB", "1 − cosine"], _layer_rows(layers),
               numeric={0, 7, 8, 11, 12, 13, 14}),
        "</div>",
        "<h2>Passes</h2>",
        _table(["#", "pass", "seconds", "modified", "max |d|", "rel L2", "1 − cosine", "SQNR dB"], _pass_rows(passes),
               numeric={0, 2, 4, 5, 6, 7}),
        "<h2>Nodes left in float</h2>",
    ]
    if float_nodes:
        parts.append('<div class="scroll">')
        parts.append(_table(["node", "op", "in float", "why"],
                            [[n.get("name"), n.get("op"), n.get("part"), n.get("reason")] for n in float_nodes]))
        parts.append("</div>")
    else:
        parts.append('<p class="note">None: every node that holds or multiplies a weight is quantized.</p>')
    parts.append(f"<p class=note>Sizes: float weights {_e(size.get('float_weight_bytes'))} bytes; artifact weights "
                 f"{_e(size.get('artifact_weight_bytes'))} bytes; artifact files {_e(size.get('artifact_file_bytes'))} bytes.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
