"""The feature dashboard as one self-contained HTML file: inline CSS and SVG, no script, nothing fetched.

sae-dashboard draws with d3 and plotly from CDNs, so its pages are blank offline; this page renders from the file
alone (the MLflow UI's artifact view, a browser with no network). `render` is a pure function of a `Dashboard`,
whatever computed it (csc.pipeline.dashboard).

Each token of an example is shaded in proportion to the latent's activation there: opacity act / max_activation
(the latent's largest activation on held-out tokens), so equal shades mean equal activations across examples.
Every latent's section carries data-latent (its index) and each token data-act (its activation), for tests and
scripts reading the page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from csc.sae.metrics import DensityHistogram

FIGURES = (("l0", "L0"), ("explained_variance", "explained variance"), ("delta_ce", "delta CE (nats)"),
           ("ce_loss_recovered", "CE loss recovered"), ("kl_spliced", "KL(clean || SAE)"),
           ("dead_fraction", "dead fraction"))
"""The header's figures of the SAE, where the evaluation has them."""
GROUPS = {"frequent": "most frequent", "sampled": "sampled"}


@dataclass(frozen=True)
class Example:
    """One top-activating context of a latent, cut to a window around its maximum."""

    tokens: list[str]
    acts: list[float]
    """The latent's activation at each token of the window (0 where the SAE does not read: BOS)."""
    peak: int
    """Index in the window of the maximum."""
    context: int
    """The held-out context it comes from."""
    position: int
    """The maximum's position in that context."""


@dataclass(frozen=True)
class LatentCard:
    latent: int
    group: str
    """"frequent" (among the most frequent latents) or "sampled" (a random live latent)."""
    frequency: float
    """Share of held-out tokens it fires on."""
    max_activation: float
    hist_edges: list[float]
    """Bin edges of its activation histogram (activation units)."""
    hist_counts: list[int]
    """Held-out tokens per bin, over the tokens it fires on."""
    examples: list[Example]
    raises: list[tuple[str, float]]
    """Tokens whose logits its decoder direction raises most, with the logit change, largest first."""
    lowers: list[tuple[str, float]]
    """... lowers most, most negative first."""


@dataclass(frozen=True)
class Dashboard:
    title: str
    subtitle: str
    figures: dict[str, float]
    """The SAE's held-out figures (FIGURES shows those present)."""
    density: DensityHistogram
    """log10 firing frequency of every latent."""
    latents: list[LatentCard]
    method: str
    """How the page was computed, one paragraph of plain text."""


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { margin: 0 0 4px; } h2 { margin: 0 0 6px; font-size: 17px; }
.sub, .note { color: #555; } .note { max-width: 980px; font-size: 13px; }
table.figures td { padding: 1px 12px 1px 0; } table.figures td.v { font-variant-numeric: tabular-nums; }
nav a { margin-right: 6px; font-family: ui-monospace, monospace; font-size: 12px; }
section.latent { border-top: 1px solid #ccc; padding: 14px 0; }
.row { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.group { font-size: 12px; color: #666; font-weight: normal; }
table.logits { border-collapse: collapse; font-size: 12px; }
table.logits td { padding: 0 8px 0 0; } table.logits td.v { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #1a5fb4; } td.down { color: #c01c28; }
.tok { white-space: pre; font-family: ui-monospace, monospace; font-size: 12px; border-radius: 2px; }
.tok.peak { outline: 1px solid #000; }
.ctx { margin: 2px 0; padding: 1px 0; } .ctx .where { color: #888; font-size: 11px; margin-right: 6px; }
svg text { font-size: 10px; fill: #444; } svg rect.bar { fill: #e66100; } svg rect.dens { fill: #5e5c64; }
"""


def _num(v: float) -> str:
    return f"{v:.4g}"


def _token_text(s: str) -> str:
    """Whitespace made visible (a newline or tab inside a line of tokens would break it)."""
    return html.escape(s.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "\u240d") or "\u2205")


def _bars(counts: list[int], labels: tuple[str, str], caption: str, css: str, width: int = 300,
          height: int = 70) -> str:
    """A bar chart in SVG: counts left to right, the first and last bin's labels under the ends."""
    top = max(max(counts, default=0), 1)
    w = width / max(len(counts), 1)
    rects = "".join(f'<rect class="{css}" x="{i * w:.1f}" y="{height - c / top * height:.1f}" '
                    f'width="{max(w - 1, 0.5):.1f}" height="{c / top * height:.1f}"><title>{c}</title></rect>'
                    for i, c in enumerate(counts) if c)
    return (f'<svg width="{width}" height="{height + 26}" viewBox="0 0 {width} {height + 26}" role="img" '
            f'aria-label="{html.escape(caption)}">'
            f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#999"/>'
            f'{rects}<text x="0" y="{height + 12}">{html.escape(labels[0])}</text>'
            f'<text x="{width}" y="{height + 12}" text-anchor="end">{html.escape(labels[1])}</text>'
            f'<text x="{width / 2}" y="{height + 24}" text-anchor="middle">{html.escape(caption)}</text></svg>')


def _activation_histogram(card: LatentCard) -> str:
    """Its non-zero activations, trimmed to the bins that hold any (the bins are log-spaced)."""
    used = [i for i, c in enumerate(card.hist_counts) if c]
    if not used:
        return '<p class="note">no activation on held-out tokens</p>'
    lo, hi = used[0], used[-1] + 1
    return _bars(card.hist_counts[lo:hi], (_num(card.hist_edges[lo]), _num(card.hist_edges[hi])),
                 "non-zero activations (log-spaced bins)", "bar")


def _logit_table(card: LatentCard) -> str:
    def cells(entries: list[tuple[str, float]], i: int, css: str) -> str:
        if i >= len(entries):
            return "<td></td><td></td>"
        text, value = entries[i]
        return f'<td class="{css} tok">{_token_text(text)}</td><td class="v {css}">{value:+.3f}</td>'

    rows = [f"<tr>{cells(card.raises, i, 'up')}{cells(card.lowers, i, 'down')}</tr>"
            for i in range(max(len(card.raises), len(card.lowers)))]
    return (f'<table class="logits"><tr><th colspan="2">raises</th><th colspan="2">lowers</th></tr>'
            f'{"".join(rows)}</table>')


def _example(ex: Example, max_activation: float) -> str:
    spans = []
    for i, (tok, a) in enumerate(zip(ex.tokens, ex.acts)):
        alpha = min(max(a / max_activation, 0.0), 1.0) if max_activation > 0 else 0.0
        peak = " peak" if i == ex.peak else ""
        spans.append(f'<span class="tok{peak}" data-act="{a:.6g}" title="{a:.4g}" '
                     f'style="background: rgba(230, 97, 0, {alpha:.3f})">{_token_text(tok)}</span>')
    return (f'<div class="ctx" data-context="{ex.context}" data-position="{ex.position}">'
            f'<span class="where">ctx {ex.context} @ {ex.position}: {ex.acts[ex.peak]:.3g}</span>'
            f'{"".join(spans)}</div>')


def _latent(card: LatentCard, rank: int) -> str:
    examples = "".join(_example(ex, card.max_activation) for ex in card.examples) or \
        '<p class="note">it fired on no held-out context</p>'
    return (f'<section class="latent" id="latent-{card.latent}" data-latent="{card.latent}" '
            f'data-group="{card.group}"><h2>latent {card.latent} <span class="group">{GROUPS[card.group]} #{rank}'
            f'</span></h2><p class="sub">fires on {card.frequency:.3%} of held-out tokens; max activation '
            f'{_num(card.max_activation)}</p>'
            f'<div class="row"><div>{_activation_histogram(card)}</div><div>{_logit_table(card)}</div></div>'
            f'<h3>top held-out contexts</h3>{examples}</section>')


def render(d: Dashboard) -> str:
    figures = "".join(f'<tr><td>{label}</td><td class="v">{_num(d.figures[key])}</td></tr>'
                      for key, label in FIGURES if key in d.figures)
    e = d.density.edges.tolist()
    density = _bars(d.density.counts.tolist(), (f"1e{e[0]:g}", f"1e{e[-1]:g}"),
                    f"latents by log10 firing frequency ({d.density.n_never_fired} never fired)", "dens", width=400)
    ranks = {g: 0 for g in GROUPS}
    sections = []
    for card in d.latents:
        ranks[card.group] += 1
        sections.append(_latent(card, ranks[card.group]))
    nav = " ".join(f'<a href="#latent-{c.latent}">{c.latent}</a>' for c in d.latents)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(d.title)}</title>'
            f'<style>{STYLE}</style></head><body><header><h1>{html.escape(d.title)}</h1>'
            f'<p class="sub">{html.escape(d.subtitle)}</p><div class="row"><table class="figures">{figures}</table>'
            f'<div>{density}</div></div><p class="note">{html.escape(d.method)}</p>'
            f'<nav>latents: {nav}</nav></header>{"".join(sections)}</body></html>\n')
