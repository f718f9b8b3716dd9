"""Feature dashboards: the streaming per-latent statistics on codes with a known answer, the HTML page on
synthetic data (the latents it claims, shading in proportion, nothing fetched), the logit tables against their
formula on the tiny model, and a dashboard made by `csc train` on the tiny model, rendered by headless Chromium."""

import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from csc.activations.models import load_language_model
from csc.activations.pairing import FIRST_ANCHOR
from csc.activations.source import Activations
from csc.config import TrainRunSpec
from csc.spec_loader import load_spec
from csc.pipeline import dashboard
from csc.pipeline import dashboard_html as page
from csc.pipeline.run import train_run
from csc.sae.export import load_sae
from csc.sae.latent_stats import LatentStats
from csc.sae.metrics import feature_density_histogram
from csc.sweep.ui import render_page
from tests.conftest import tiny_spec


class Page(HTMLParser):
    """What a dashboard shows: per latent section, its group, tokens (text, data-act, shade) and logit rows."""

    def __init__(self, text: str):
        super().__init__()
        self.latents: dict[int, dict] = {}
        self._cur: dict | None = None
        self._tok: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-latent" in a:
            self._cur = {"group": a["data-group"], "tokens": [], "contexts": 0, "logit_rows": 0}
            self.latents[int(a["data-latent"])] = self._cur
        elif self._cur is not None and tag == "div" and a.get("class") == "ctx":
            self._cur["contexts"] += 1
        elif self._cur is not None and tag == "span" and "data-act" in a:
            alpha = float(re.search(r"rgba\(230, 97, 0, ([0-9.]+)\)", a["style"]).group(1))
            self._tok = {"act": float(a["data-act"]), "alpha": alpha, "peak": "peak" in a["class"], "text": ""}
            self._cur["tokens"].append(self._tok)
        elif self._cur is not None and tag == "td" and "up" in a.get("class", "") and "tok" in a.get("class", ""):
            self._cur["logit_rows"] += 1

    def handle_endtag(self, tag):
        if tag == "span":
            self._tok = None
        elif tag == "section":
            self._cur = None

    def handle_data(self, data):
        if self._tok is not None:
            self._tok["text"] += data


def assert_self_contained(text: str) -> None:
    """Nothing to fetch: no URL, no external script, stylesheet, font or image; links only within the page."""
    assert not re.search(r"https?://", text, re.I)
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|@font-face", text, re.I)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    assert not re.search(r'\ssrc=', text)


def test_latent_stats_streams_the_known_answer():
    z = torch.zeros(4, 5, 3)
    for c in range(4):
        z[c, :, 0] = c + torch.arange(5) / 10  # fires everywhere, largest at the last position of the last context
    z[1, 2, 2], z[3, 0, 2], z[2, 1, 2], z[2, 4, 2] = 0.5, 7.0, 1.0, 3.0  # latent 1 never fires
    stats = LatentStats(3, k=2)
    stats.update(z[:2], torch.tensor([0, 1]))  # two batches: the top contexts merge across them
    stats.update(z[2:], torch.tensor([2, 3]))
    assert stats.tokens == 20 and stats.fires.tolist() == [19, 0, 4]  # z = 0 at context 0, position 0
    assert stats.top(0) == [pytest.approx((3.4, 3, 4)), pytest.approx((2.4, 2, 4))]
    assert stats.top(1) == []
    assert stats.top(2) == [(7.0, 3, 0), (3.0, 2, 4)]  # one example per context: context 2's 1.0 is not another
    edges = stats.bin_edges
    for v in (0.5, 1.0, 3.0, 7.0):
        b = int(torch.searchsorted(edges, torch.tensor(v, dtype=torch.float64), right=True)) - 1
        assert stats.hist[2, b] == 1, v
    assert stats.hist[2].sum() == 4 and stats.hist[1].sum() == 0 and stats.hist[0].sum() == 19


def synthetic() -> page.Dashboard:
    def card(latent, group, acts_list, peak_list):
        tokens = ["<bos>", "a<b>&", "\n", " the"]
        examples = [page.Example(tokens=tokens[:len(a)], acts=a, peak=p, context=i, position=p)
                    for i, (a, p) in enumerate(zip(acts_list, peak_list))]
        return page.LatentCard(latent=latent, group=group, frequency=0.25,
                               max_activation=max(ex.acts[ex.peak] for ex in examples),
                               hist_edges=[0.1, 1.0, 10.0, 100.0], hist_counts=[0, 3, 1],
                               examples=examples, raises=[("up", 1.5), (" x", 0.5)], lowers=[("down", -2.0)])

    return page.Dashboard(
        title="Feature dashboard: test", subtitle="synthetic", figures={"l0": 12.5, "delta_ce": 0.25},
        density=feature_density_histogram(torch.tensor([0, 5, 50, 500]), 1000),
        latents=[card(7, "frequent", [[0.0, 4.0, 1.0, 2.0], [0.0, 0.0, 3.0]], [1, 2]),
                 card(3, "sampled", [[0.0, 0.5, 0.25]], [1])],
        method="how it was made")


def test_page_shows_the_latents_it_claims_shaded_in_proportion_and_fetches_nothing():
    text = page.render(synthetic())
    assert_self_contained(text)
    shown = Page(text)
    assert list(shown.latents) == [7, 3]
    assert shown.latents[7]["group"] == "frequent" and shown.latents[3]["group"] == "sampled"
    assert shown.latents[7]["contexts"] == 2 and shown.latents[7]["logit_rows"] == 2
    toks = shown.latents[7]["tokens"]
    assert [t["act"] for t in toks] == [0.0, 4.0, 1.0, 2.0, 0.0, 0.0, 3.0]
    for t in toks:  # opacity = activation / the latent's largest (4.0), to the 3 decimals written
        assert t["alpha"] == pytest.approx(t["act"] / 4.0, abs=5e-4)
    assert [t["peak"] for t in toks] == [False, True, False, False, False, False, True]
    assert [t["text"] for t in toks[:4]] == ["<bos>", "a<b>&", "\u21b5", " the"]  # escaped, newline made visible
    assert [t["alpha"] for t in shown.latents[3]["tokens"]] == [0.0, 1.0, 0.5]
    assert "L0" in text and "12.5" in text and "explained variance" not in text  # only the figures given
    assert 'href="#latent-7"' in text and 'href="#latent-3"' in text


def test_logit_tables_are_the_final_norm_and_unembedding_of_each_direction(cache, one_torch_thread):
    lm = load_language_model(tiny_spec(cache).model, cache)
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(3, lm.d_model), dim=1)
    tables = dashboard.lm_tables(lm, dirs, [2, 70, 71], k=5)
    # Gemma2's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w); no head bias; unit-norm directions: mean(x^2) = 1/d
    norm = lm.model.model.norm
    expected = (dirs * (1 + norm.weight)) / math.sqrt(1 / lm.d_model + norm.eps) @ lm.model.lm_head.weight.T
    for n in range(3):
        top, bottom = expected[n].topk(5), expected[n].topk(5, largest=False)
        assert [v for _, v in tables.raises[n]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-5)
        assert [v for _, v in tables.lowers[n]] == pytest.approx(bottom.values.tolist(), rel=1e-4, abs=1e-5)
        assert [s for s, _ in tables.raises[n]] == [lm.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert tables.strings == {2: "<bos>", 70: lm.tokenizer.decode([70]), 71: lm.tokenizer.decode([71])}


TINY = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
        "activations.contexts_per_shard=8", "activations.train_tokens=1024", "activations.eval_tokens=512",
        "sae.dict_size=128", "trainer.steps=20", "trainer.batch_size=64", "trainer.lr_warmup_steps=5",
        "trainer.beta_warmup_steps=5", "trainer.gamma_warmup_steps=5", "trainer.log_every=5",
        "eval.ce_contexts=2", "eval.probe_examples_per_class=16", "checkpoint_every=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[TrainRunSpec, Path]:
    root = tmp_path_factory.mktemp("dashboard")
    spec = load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={root / 'cache'}"])
    train_run(spec, root / "run", progress=False)
    return spec, root / "run"


def test_train_run_dashboard_shows_the_held_out_data(trained):
    """The frequent latents are the held-out data's most frequent, the sampled ones live others, and each top
    context's boxed token carries that context's largest code of the latent (recomputed here from the shards)."""
    spec, run = trained
    text = (run / dashboard.FILE).read_text()
    assert_self_contained(text)
    shown = Page(text)
    sae, _ = load_sae(run / "sae")
    acts = Activations(spec)
    x = torch.cat([acts.shard("eval", i).acts for i in range(acts.n_shards["eval"])])[:, FIRST_ANCHOR:]
    z = sae.encode(x.float().reshape(-1, x.shape[-1]) * acts.scale).reshape(*x.shape[:2], -1)
    fires = (z != 0).sum(dim=(0, 1))
    frequent = [j for j, v in shown.latents.items() if v["group"] == "frequent"]
    sampled = [j for j, v in shown.latents.items() if v["group"] == "sampled"]
    assert len(frequent) == spec.eval.dashboard_frequent and len(sampled) == spec.eval.dashboard_sampled
    assert min(fires[frequent]) >= max(fires[j] for j in range(fires.numel()) if j not in frequent)
    assert all(fires[j] > 0 for j in sampled)
    for j in frequent + sampled:
        peaks = [t["act"] for t in shown.latents[j]["tokens"] if t["peak"]]
        best = z[..., j].amax(dim=1).sort(descending=True).values
        assert peaks == pytest.approx(best[:len(peaks)].tolist(), rel=1e-4, abs=1e-5)
        assert len(peaks) == min(spec.eval.dashboard_contexts, int((best > 0).sum()))
        assert shown.latents[j]["logit_rows"] == dashboard.LOGIT_TOKENS


def test_dashboard_fields_set_the_latents_and_contexts_shown(trained):
    spec, run = trained
    sae, _ = load_sae(run / "sae")
    shown = {}
    for seed in (0, 1):
        other = spec.model_copy(update={"eval": spec.eval.model_copy(update={
            "dashboard_frequent": 3, "dashboard_sampled": 5, "dashboard_contexts": 2, "dashboard_seed": seed})})
        shown[seed] = Page(dashboard.build(other, sae, Activations(other), {})).latents
        groups = [v["group"] for v in shown[seed].values()]
        assert groups.count("frequent") == 3 and groups.count("sampled") == 5
        assert all(0 < v["contexts"] <= 2 for v in shown[seed].values())
    frequent = [{j for j, v in s.items() if v["group"] == "frequent"} for s in shown.values()]
    sampled = [{j for j, v in s.items() if v["group"] == "sampled"} for s in shown.values()]
    assert frequent[0] == frequent[1] and sampled[0] != sampled[1]  # the seed draws the sampled ones only


def test_train_run_dashboard_renders_in_headless_chromium(trained):
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (CI installs the Debian package `chromium`)")
        pytest.skip("needs headless Chromium (Debian package `chromium`)")
    spec, run = trained
    source = Page((run / dashboard.FILE).read_text())
    dom = render_page((run / dashboard.FILE).resolve().as_uri(), wait_ms=1000)
    rendered = Page(dom)
    assert len(rendered.latents) == spec.eval.dashboard_frequent + spec.eval.dashboard_sampled
    assert rendered.latents == source.latents  # every latent it claims, with its contexts, tokens and logit rows
    assert all(v["contexts"] > 0 and v["logit_rows"] > 0 for v in rendered.latents.values())
    assert "Feature dashboard: tiny-gemma2 layer 2" in dom
