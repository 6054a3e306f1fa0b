"""The report: one offline HTML page whose plots all draw, escaped model text, valid figure
files, and numbers that say what the organism's ground truth says."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
from _browser import check_page

from thinklens import figures
from thinklens.cli import main
from thinklens.errors import ConfigError, ThinklensError
from thinklens.report import Report, Section, Table, study
from thinklens.report.page import FIGURES, PAGE
from thinklens.zoo.registry import STUDY_PROMPTS as ORGANISM_PROMPTS

NASTY = "<script>alert(1)</script> <b>x</b> c = 1 ; ? c"
PROMPTS = [ORGANISM_PROMPTS[0], NASTY, ORGANISM_PROMPTS[2]]


def _browser() -> str | None:
    try:
        return figures.find_browser()
    except ThinklensError:
        return None


needs_browser = pytest.mark.skipif(_browser() is None, reason="no Chromium; run .ci/browser")


@pytest.fixture(scope="module")
def rep(organism):
    return study(organism, prompts=PROMPTS, n_probe=45, progress=False)


@pytest.fixture(scope="module")
def written(rep, tmp_path_factory):
    if _browser() is None:
        pytest.skip("no Chromium; run .ci/browser")
    out = tmp_path_factory.mktemp("report")
    (out / FIGURES).mkdir()
    (out / FIGURES / "99-stale.svg").write_text("<svg/>")
    (out / FIGURES / "notes.txt").write_text("mine")
    path = rep.write(out, progress=False)
    assert (out / FIGURES / "notes.txt").read_text() == "mine"      # not ours: kept
    (out / FIGURES / "notes.txt").unlink()
    return path, path.read_text(encoding="utf-8")


def _section(rep, title):
    return next(s for s in rep.sections if s.title.startswith(title))


# ---- the page ---------------------------------------------------------------------------

def test_page_is_self_contained_with_plotly_inline_once(rep, written):
    from plotly.offline import get_plotlyjs

    path, page = written
    n = len(rep.figures())
    n_att = len(_section(rep, "Attention").figures)  # a figure per layer of the two heads + 1
    # traces 3, attention, anchors 3, probe 1, lens 2, patching 2, circuit 3, phase change 2
    assert path.name == PAGE and n_att in (2, 3) and n == 3 + n_att + 3 + 1 + 2 + 2 + 3 + 2
    assert page.count(get_plotlyjs()) == 1                     # the whole library, once
    assert page.count("plotly.js v") == 1
    tags = re.findall(r"<script\b[^>]*>", page)
    assert len(tags) == 1 + n                                  # plotly.js + one per figure
    assert not any("src=" in t for t in tags)                  # nothing loaded from anywhere
    assert not re.search(r"<(link|img|iframe)\b", page)
    assert page.count("Plotly.newPlot(") == n
    assert not list(path.parent.glob(".*.tmp"))                # no temporary file left


def test_model_text_is_escaped(rep, written):
    _, page = written
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;b&gt;x&lt;/b&gt;" in page
    assert "<script>alert" not in page and "<b>x</b>" not in page
    trace = rep.sections[0]
    assert trace.table.rows[1][1] == NASTY                     # kept raw, escaped on render
    # the figure holds plotly's escaped text, and the JSON escapes '<' besides
    assert "alert(1)" in json.dumps(trace.figures[1].fig.layout.title.text)
    assert "<" not in trace.figures[1].fig.layout.title.text


def test_figure_files_are_valid_pdf_and_svg(rep, written):
    path, page = written
    assert not (path.parent / FIGURES / "99-stale.svg").exists()   # left by an earlier run
    stems = [stem for stem, _ in rep.figures()]
    files = sorted(p.name for p in (path.parent / FIGURES).iterdir())
    assert files == sorted(f"{s}.{fmt}" for s in stems for fmt in ("pdf", "svg"))
    for s in stems:
        pdf = (path.parent / FIGURES / f"{s}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
        root = ET.parse(path.parent / FIGURES / f"{s}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert len(list(root.iter())) > 20                     # drawn, not an empty canvas
        assert f'href="{FIGURES}/{s}.pdf"' in page and f'href="{FIGURES}/{s}.svg"' in page


@needs_browser
def test_every_plot_draws_in_a_browser_without_errors(rep, written):
    path, _ = written
    res = check_page(path, browser=_browser())
    assert res.errors == []
    plots = json.loads(res.value)
    assert [p["id"] for p in plots] == [f"fig-{stem}" for stem, _ in rep.figures()]
    for p in plots:
        assert p["svgs"] >= 1 and p["shapes"] > 0, p


@needs_browser
def test_the_browser_check_catches_broken_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><div class="js-plotly-plot" id="p"></div>'
                   '<script>throw new Error("deliberate x")</script>'
                   '<script>console.error("logged y")</script>'
                   '<script src="missing.js"></script></body></html>')
    res = check_page(bad, browser=_browser())
    assert any("deliberate x" in e for e in res.errors)
    assert any("logged y" in e for e in res.errors)
    assert any("missing.js" in e for e in res.errors)
    assert json.loads(res.value) == [{"id": "p", "svgs": 0, "shapes": 0}]   # nothing drawn
    (tmp_path / "ok.html").write_text('<html><body><script>console.log("fine")</script>'
                                      "</body></html>")
    assert check_page(tmp_path / "ok.html", browser=_browser()).errors == []


# ---- what the numbers say ---------------------------------------------------------------

def test_probe_reads_the_computed_value_from_layer_1_and_the_control_does_not(rep):
    rows = {r[0]: r for r in _section(rep, "Probes").table.rows}
    # columns: site, accuracy, CI low, CI high, control, selectivity
    for layer in (1, 2, 3):
        site, acc, lo, hi, control, sel = rows[f"blocks.{layer}.hook_resid_post"]
        assert acc >= 0.95 and lo <= acc <= hi and control <= 0.35
        assert sel == pytest.approx(acc - control, abs=1e-6)
    assert rows["blocks.0.hook_resid_post"][1] < 0.5   # not yet computed after layer 0


def test_patching_shows_the_answer_copied_from_the_written_result(rep, organism):
    from thinklens.circuits import patch
    from thinklens.zoo import change_constant

    s = _section(rep, "Activation patching")
    pair = change_constant(organism, PROMPTS[0], "a", 0)  # root constant 7 -> 0 (+3 mod 10)
    assert pair.clean_trace.prompt in s.text and pair.corrupt_trace.prompt in s.text
    r = patch(organism, pair, "resid_pre", by=("layer", "pos"), layers=[0],
              positions=[pair.answer_pos - 2, pair.answer_pos], progress=False)
    norm = r.normalized()[0]
    # at layer 0 the answer position knows nothing yet; the last written value ("= 9 .")
    # carries everything the answer reads
    assert norm[1] == pytest.approx(0.0, abs=0.05) and norm[0] == pytest.approx(1.0, abs=0.1)
    rows = [r for r in s.table.rows if r[0] == "resid_pre"]
    assert any(r[1] == 0 and r[2].startswith(f"position {pair.answer_pos - 2}:")
               and r[3] > 0.9 for r in rows)


def test_attention_shows_the_heads_patching_picked(rep):
    z = [r for r in _section(rep, "Activation patching").table.rows if r[0] == "z"][:2]
    names = [a.text for f in _section(rep, "Attention").figures[:-1]
             for a in f.fig.layout.annotations]
    assert sorted(names) == sorted(f"L{layer} H{h.split()[1]}" for _, layer, h, _ in z)


def test_circuit_holds_the_head_exact_patching_ranks_first(rep):
    s = _section(rep, "Circuit")
    (_, layer, head, effect) = next(r for r in _section(rep, "Activation patching").table.rows
                                    if r[0] == "z")
    assert effect > 0.5                                      # one head carries most of it
    node = f"a{layer}.h{head.split()[1]}"
    edges = s.table.rows
    assert any(a == node or b.startswith(node + ".") for a, b, _ in edges)
    scores = [abs(v) for _, _, v in edges]
    assert scores == sorted(scores, reverse=True)
    faith = float(re.search(r"circuit's is (-?[0-9]+\.[0-9]+)", s.text)[1])
    n = int(re.search(r"the (\d+) highest-scoring edges", s.text)[1])
    curve = s.figures[1].fig.data[0]
    assert faith >= 0.8 and max(curve.y) >= 0.8 and n in list(curve.x)
    scatter = {t.name.split(" (")[0]: t for t in s.figures[2].fig.data if t.meta}  # vs exact z
    assert set(scatter) == {"AtP", "EAP-IG"}
    assert scatter["AtP"].meta["spearman"] >= 0.8 and scatter["AtP"].meta["n"] == 16


def test_anchors_total_effect_column_is_suppression_total_of_the_ranked_trace(rep, organism):
    from thinklens import circuits
    from thinklens.report.anchors import MAX_REWRITE

    rows = _section(rep, "Thought anchors").table.rows
    texts = [r[1] for r in rows]
    trace = next(t for t in (organism.think(p) for p in PROMPTS)
                 if [x.text[:80] for x in t.sentences] == texts)
    budget = min(MAX_REWRITE, len(trace.token_ids) - trace.sentences[0].end + 8)
    want = circuits.suppression_total(organism, trace, max_new_tokens=budget).answer_kl
    got = torch.tensor([r[4] for r in rows])
    assert torch.allclose(got, want, atol=1e-3)
    assert float(got.max()) > 1.0   # hiding the step the answer copies moves the answer


def test_logit_lens_ends_on_the_answer(rep):
    rows = _section(rep, "Logit lens").table.rows
    assert rows[-1][0] == "blocks.3.hook_resid_post"
    assert 0 < rows[-1][1] <= 1 and rows[0][1] <= rows[-1][1]


# ---- other models, the CLI, the builder -------------------------------------------------

# organism-vocabulary completions for the random-weight Qwen2 (its own generations are noise)
GIVEN = [
    ("c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
     "a = 7 . b = 7 - 2 = 5 . b = 5 . c = 5 + 4 = 9 . c = 9 . </think> 9", "9"),
    ("e = 5 ; d = e + 3 ; g = 1 ; ? d",
     "e = 5 . d = 5 + 3 = 8 . d = 8 . g = 1 . d = 8 . </think> 8", "8"),
    ("h = f - 1 ; f = k + 6 ; k = 2 ; j = 9 ; ? h",
     "k = 2 . f = 2 + 6 = 8 . f = 8 . h = 8 - 1 = 7 . h = 7 . </think> 7", "6"),
]


def _drawn(page_path):
    res = check_page(page_path, browser=_browser())
    plots = json.loads(res.value)
    return res.errors, plots


def test_report_on_given_traces_of_any_model(qwen2, qwen2_dir, tmp_path, capsys):
    from thinklens.hooks.trace import Trace

    file = tmp_path / "traces.jsonl"
    trs = [Trace.from_text(qwen2, p, c, meta={"id": f"t{k}", "answer": a})
           for k, (p, c, a) in enumerate(GIVEN)]
    file.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trs))
    out = tmp_path / "out"
    code = main(["report", "--model", str(qwen2_dir), "--traces", str(file), "--out", str(out),
                 "--formats", "", "--no-progress"])
    assert code == 0 and "report.html" in capsys.readouterr().out
    page = (out / PAGE).read_text()
    assert "needs ground truth" not in page                 # nothing skipped for lack of a task
    assert page.count("Plotly.newPlot(") >= 10
    for title in ("Thought anchors", "Activation patching", "Circuit", "Logit lens toward"):
        assert title in page
    assert "changed &#x27;" in page                         # the pair says what it changed
    assert "Correctness probe not fitted, too little data: 2 correct and 1 wrong" in page
    assert "Tag probe not fitted, too little data" in page
    # the third given answer (7) is not its row's (6): the own answer is what it wrote
    assert re.search(r"<td class=\"mono\">7</td><td>no</td>", page)
    if _browser() is not None:
        errors, plots = _drawn(out / PAGE)
        assert errors == [] and len(plots) >= 10
        assert all(p["svgs"] >= 1 and p["shapes"] > 0 for p in plots), plots


def test_report_on_the_r1_distill_interface_with_given_traces(r1, tmp_path):
    """The random-weight R1-Distill-shaped model with the real tokenizer, on R1-style
    completions: every part drawn, the pair and the lens on the given text."""
    from _r1 import COMPLETIONS, completion

    from thinklens.hooks.trace import Trace

    trs = [Trace.from_text(r1, p, completion(k, open_think=False), meta={"answer": a})
           for k, (p, _, a) in enumerate(COMPLETIONS)]
    rep = study(r1, traces=trs, progress=False)
    assert len(rep.figures()) >= 10
    for title in ("Thought anchors", "Activation patching", "Circuit", "Logit lens toward"):
        assert _section(rep, title).figures, title
    assert _section(rep, "Thought anchors").note.startswith("Resampling importance is off")
    assert "changed '" in _section(rep, "Activation patching").text
    own = rep.sections[0].table.rows
    assert [r[4] for r in own] == [a for _, _, a in COMPLETIONS]      # \boxed{} answers
    path = rep.write(tmp_path, formats=(), progress=False)
    if _browser() is not None:
        errors, plots = _drawn(path)
        assert errors == [] and len(plots) == len(rep.figures())
        assert all(p["svgs"] >= 1 and p["shapes"] > 0 for p in plots), plots


def test_a_trace_cut_at_the_token_limit_is_listed_as_truncated(qwen2):
    from thinklens.hooks.trace import Trace
    from thinklens.report import sections

    trs = qwen2.think_batch(["a = 7 ; ? a", "b = 2 ; ? b", "c = 1 ; ? c", "d = 3 ; ? d"],
                            max_new_tokens=2, progress=False)
    cut = [t for t in trs if t.meta["finished"] is False]  # stopped by the limit, not eos
    assert cut
    done = Trace.from_text(qwen2, "a = 7 ; ? a", "a = 7 . </think> 7")
    table = sections.traces(qwen2, [*cut, done]).table
    col = table.columns.index("truncated")
    assert [r[col] for r in table.rows] == ["yes"] * len(cut) + ["no"]


@pytest.mark.smollm
@pytest.mark.slow
def test_report_on_smollm_studies_its_own_answers(smollm, tmp_path):
    from thinklens.circuits.pairs import own_answer_token
    from thinklens.hooks.answers import generic_answer
    from thinklens.theme import escape

    rep = study(smollm, n_problems=8, max_new_tokens=48, progress=False)
    assert len(rep.figures()) >= 10
    assert "needs ground truth" not in " ".join((s.note or "") + s.text for s in rep.sections)
    lens = _section(rep, "Logit lens toward")
    assert lens.figures
    for f in lens.figures:                     # the token the trace wrote as its answer,
        t = rep.traces[int(f.name.rsplit("-", 1)[1])]   # over the tokens before it
        a = own_answer_token(t, generic_answer)
        assert a is not None and t.tokens[a].strip() == generic_answer(t)[0]
        shown = [i for i in t.think_span.range if i < a] or list(range(t.prompt_span.end, a))
        assert list(f.fig.layout.xaxis.ticktext) == [escape(t.tokens[i]) for i in shown]
        assert min(shown) >= t.prompt_span.end and f"(token {a})" in f.fig.layout.xaxis.title.text
        assert repr(t.tokens[a]) in f.caption
    s = _section(rep, "Activation patching")
    assert "changed '" in s.text and s.figures
    path = rep.write(tmp_path, formats=(), progress=False)
    if _browser() is not None:
        errors, plots = _drawn(path)
        assert errors == [] and all(p["shapes"] > 0 for p in plots)


def test_builder_escapes_and_checks(tmp_path):
    rep = Report("t <i>", meta={"m": "<x>"})
    rep.add(Section("a & b", "p1\n\np2 <u>", table=Table(["c<"], [["<v>"], [0.5], [3]]),
                    note="<n>"))
    from plotly.offline import get_plotlyjs

    page = rep.write(tmp_path, formats=()).read_text().replace(get_plotlyjs(), "")
    for raw in ("<i>", "<x>", "<u>", "<v>", "<n>", "c<"):
        assert raw not in page
    assert "<p>p1</p>" in page and "&lt;v&gt;" in page and ">0.500<" in page and ">3<" in page
    with pytest.raises(ConfigError, match="do not have 2 cells"):
        Table(["a", "b"], [[1]])
    with pytest.raises(ConfigError, match="'pdf', 'svg', 'png'"):
        rep.write(tmp_path, formats=("jpg",))
    with pytest.raises(ConfigError, match="n_problems=0"):
        study("organism", n_problems=0)
    with pytest.raises(ConfigError, match="non-empty strings"):
        study("organism", prompts=["c = 1 ; ? c", " "])


def test_study_restores_torch_threads(organism):
    import torch

    from thinklens.report.studies import _one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), _one_thread(True):
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_anchors_section_leaves_out_what_does_not_fit_the_memory_budget(organism, monkeypatch):
    """A long trace must not take the whole report down: the measures over budget are left
    out with the refusal in the note (here: a tiny budget for every check)."""
    from thinklens.hooks import budget as budget_mod
    from thinklens.report.anchors import anchors

    trs = [organism.think(p) for p in PROMPTS]
    monkeypatch.setattr(budget_mod, "parse_budget", lambda budget, device: 1000)
    s = anchors(organism, trs, total=False)
    assert "suppression left out: suppression of a" in s.note
    assert "attribution left out: sentence_attribution of a" in s.note
    assert "Alternatives: batch_size=1" in s.note
