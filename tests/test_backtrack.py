"""The second organism: its generator's ground truth (hand-checked), its rates, the trained
model's accuracy, sentence_truth on sampled traces, edit_step, and the steering hook."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

import thinklens
from thinklens.errors import ConfigError
from thinklens.hooks.task import Task
from thinklens.hooks.trace import Trace
from thinklens.zoo import backtrack as B
from thinklens.zoo.backtrack_task import BacktrackConfig, analyse, generate, implied_so_far
from thinklens.zoo.steer_backtrack import backtrack_steering
from thinklens.zoo.task import problem_from_prompt
from thinklens.zoo.train import (
    TrainConfig,
    _batch_problems,
    _loss,
    _make_batch,
    _model_config,
    _vocab,
    train,
)

PROMPT = "h = g + 9 ; c = b + 4 ; g = 3 ; a = 7 ; b = a - 2 ; ? c"
DETOUR_FIXED = ("h = g + 9 . g = 3 . h = 3 + 9 = 2 . c = b + 4 . b = a - 2 . a = 7 . "
                "b = 7 - 2 = 4 . wait b = 7 - 2 = 5 . c = 5 + 4 = 9 .")
KEPT = "c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 4 . c = 4 + 4 = 8 ."


def _truth(thinking: str):
    p = problem_from_prompt(PROMPT)
    return analyse(p.statements, p.query, thinking.split())


def test_hand_checked_detour_and_correction():
    sentences, tokens, implied = _truth(DETOUR_FIXED)
    assert [s.role for s in sentences] == ["irrelevant"] * 3 + ["needed"] * 3 + [
        "mistake", "correction", "needed"]
    assert [s.depends for s in sentences] == [False] * 3 + [True] * 3 + [False, True, True]
    assert [s.chain for s in sentences] == ["detour"] * 3 + ["main"] * 6
    assert sentences[6].corrected and (sentences[6].written, sentences[6].correct) == (4, 5)
    assert implied == 9
    # c's compute step copies its operand from the correction's result, not the mistake's
    words = DETOUR_FIXED.split()
    c_eq = len(words) - 7  # 'c', '=' (first), '5', ...
    assert words[c_eq - 1: c_eq + 2] == ["c", "=", "5"] and tokens[c_eq].role == "eq"
    src = tokens[c_eq].source_pos
    assert words[src] == "5" and tokens[src].role == "result" and tokens[src].sentence == 7
    assert tokens[c_eq].chain == "main" and tokens[c_eq].value == 9


def test_hand_checked_kept_mistake_propagates():
    sentences, _, implied = _truth(KEPT)
    assert [s.role for s in sentences] == ["needed", "needed", "needed", "mistake", "needed"]
    # the answer follows the written 4 (8, not the true 9); the root's 7 reaches it only
    # through the mistake, whose wrong value is not computed from it
    assert implied == 8 and problem_from_prompt(PROMPT).answer == 9
    assert [s.depends for s in sentences] == [True, True, False, True, True]
    assert not sentences[3].corrected
    other = _truth("c = b + 5 . b = a - 2 .")[0]
    assert [s.role for s in other] == ["other", "needed"]


def test_generator_rates_and_answers_follow_the_thinking():
    cfg = BacktrackConfig(max_depth=8)
    rng = random.Random(0)
    n, detours, steps, mistakes, fixed, lens = 1000, 0, 0, 0, 0, []
    for _ in range(n):
        p = generate(rng, cfg)
        sentences, _, implied = analyse(p.statements, p.query, p.thinking, per_token=False)
        assert p.statements[0].var not in p.chain and "other" not in {s.role for s in sentences}
        assert p.answer == implied and p.completion.endswith(f"</think> {implied} <eos>")
        uncorrected = [s for s in sentences if s.role == "mistake" and not s.corrected]
        assert (implied == p.true_answer) or any(s.chain == "main" for s in uncorrected)
        detours += sentences[0].chain == "detour"
        steps += sum(s.kind == "compute" and s.role != "correction" for s in sentences)
        mistakes += sum(s.role == "mistake" for s in sentences)
        fixed += sum(s.role == "mistake" and s.corrected for s in sentences)
        lens.append((p.depth, len(sentences)))
    # about 3.5 binomial standard deviations each (n = 1000 traces, ~3300 steps, ~400 mistakes)
    assert abs(detours / n - cfg.p_detour) < 0.05
    assert abs(mistakes / steps - cfg.p_mistake) < 0.02
    assert abs(fixed / mistakes - cfg.p_correct) < 0.075
    assert max(k for d, k in lens if d == 8) >= 20  # long traces for sentence statistics


def test_implied_so_far_hand_checked():
    p = problem_from_prompt(PROMPT)
    # nothing of c's chain written: computed from the prompt (a = 7, b = 5, c = 9)
    assert implied_so_far(p.statements, "c", "h = g + 9 . g = 3 .".split()) == 9
    # b written wrong and kept: c follows it (4 + 4); corrected: c follows the fix
    assert implied_so_far(p.statements, "c", KEPT.split()[:-8]) == 8
    assert implied_so_far(p.statements, "c", DETOUR_FIXED.split()[:-8]) == 9
    assert implied_so_far(p.statements, "c", "a = 6 .".split()) == 8  # miscopied root


def test_early_exits_and_filler_examples_and_their_labels():
    cfg = BacktrackConfig(max_depth=8, p_early=0.3, p_filler=0.1)
    rng, n, early, filler = random.Random(1), 1500, [], []
    for _ in range(n):
        p = generate(rng, cfg, direct=False)
        (early if p.early else filler if p.filler else []).append(p)
    assert abs(len(filler) / n - 0.1) < 0.025 and abs(len(early) / n - 0.9 * 0.3) < 0.04
    for p in filler:
        assert set(p.thinking) == {"."} and p.answer == p.true_answer
        assert p.unlabelled() == set(range(len(p.thinking) + 1))   # only answer + eos
    for p in early:
        assert p.thinking[-1] == "." and p.answer == implied_so_far(
            p.statements, p.query, p.thinking)
        assert p.unlabelled() == {len(p.thinking)}                 # its forced </think>
    ids, _, labels = _make_batch(early[:1] + filler[:1], _vocab("backtrack"))
    vocab = {v: k for k, v in _vocab("backtrack").items()}
    for row, p in enumerate(early[:1] + filler[:1]):
        kept = [vocab[int(t)] for t in labels[row] if t != -100]
        want = ([] if p.filler else p.thinking) + [str(p.answer), "<eos>"]
        assert kept == want
    # configs without them draw exactly the same problems as before the two knobs
    a, b = random.Random(7), random.Random(7)
    plain, knobs = BacktrackConfig(max_depth=8), BacktrackConfig(max_depth=8, p_early=0.0)
    assert [generate(a, plain).completion for _ in range(50)] == \
        [generate(b, knobs).completion for _ in range(50)]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return thinklens.load("organism-backtrack")


@pytest.fixture(scope="module")
def sampled(model):
    rows = model.task.problems(48, depths=(4, 6, 8), seed=3)
    return model.think_batch([r["prompt"] for r in rows], temperature=1.0, seed=0,
                             max_new_tokens=256, progress=False)


def test_load_and_task(model):
    assert model.task is B.BACKTRACK and model.task.name == "organism-backtrack"
    assert json.loads((B.backtrack_folder() / "config.json").read_text())[
        "thinklens_task"] == "backtrack"
    assert B.checkpoints() and B.training_curve()[-1]["step"] >= B.checkpoints()[-1]
    with pytest.raises(ConfigError, match="per-sentence ground truth"):
        Task(name="plain").sentence_truth(None)


def test_greedy_accuracy_held_out(model):
    rows = model.task.problems(64, depths=(1, 2, 3, 4), seed=11)
    traces = model.think_batch([r["prompt"] for r in rows], max_new_tokens=96, progress=False)
    hits = [model.task.extract_answer(t) == str(r["answer"]) for t, r in zip(traces, rows)]
    assert sum(hits) >= 63, f"{sum(hits)}/64 greedy answers right"
    for t, r in zip(traces, rows):  # greedy: the plain chain (after a detour, sometimes)
        plain = model.task.completion(r["prompt"]).split(" </think>")[0]
        main = [s.text for s in model.task.sentence_truth(t) if s.chain == "main"]
        assert " ".join(main) == plain and "mistake" not in {
            s.role for s in model.task.sentence_truth(t)}


def test_sentence_truth_on_sampled_traces(model, sampled):
    roles = set()
    for tr in sampled:
        truth = model.task.sentence_truth(tr)
        assert [(s.start, s.end) for s in truth] == [(s.start, s.end) for s in tr.sentences]
        assert [s.text for s in truth] == [s.text.strip() for s in tr.sentences]
        roles |= {s.role for s in truth}
        tokens = B.token_truth(tr)
        for k, t in enumerate(tokens):  # the operand copy reads the latest written value
            if t is not None and t.role == "operand" and t.source_pos >= 0:
                assert tr.tokens[k].strip() == tr.tokens[t.source_pos].strip()
    assert {"needed", "irrelevant", "mistake", "correction"} <= roles
    # measured on 400 traces (depths 1-8): detour 0.30 (trained 0.3), mistakes 0.09 per value,
    # the answer follows the written thinking in 98.5 % and differs from the truth in 31 %;
    # 'wait' sentences (0.27 per trace) mostly redo a right step (see the module docs)
    rates = B.behaviour_rates(sampled)
    assert rates.other < 0.02 and rates.follows_thinking >= 0.9
    assert 0.1 <= rates.detour <= 0.5 and 0.03 <= rates.mistake <= 0.2
    assert rates.corrections > 0.05 and rates.answer_changed > 0.1


def test_edit_step(model):
    tr = Trace.from_text(model, PROMPT, DETOUR_FIXED + " </think> 9")
    e = B.edit_step(tr, 8, 2)  # c = 5 + 4 = 9  ->  c = 8 + 4 = 2
    assert (e.text, e.expected, e.role, e.depends) == ("c = 8 + 4 = 2 .", "2", "needed", True)
    assert e.prefix.endswith("wait b = 7 - 2 = 5 . c = 8 + 4 = 2 .")
    e = B.edit_step(tr, 7, 1)  # the correction: b = 6 - 2 = 1 -> c = 1 + 4 = 5
    assert (e.text, e.expected) == ("wait b = 3 - 2 = 1 .", "5")
    e = B.edit_step(tr, 2, 0, consistent=False)  # the detour: the answer stays
    assert (e.text, e.expected, e.depends) == ("h = 3 + 9 = 0 .", "9", False)
    assert B.edit_step(tr, 5, 1).expected == "3"  # a = 1: b = 1 - 2 = 9, c = 9 + 4 = 3
    for bad, match in [((9, 1), "sentences"), ((3, 1), "writes no value"),
                       ((8, 9), "other than 9"), ((8, 10), "digit")]:
        with pytest.raises(ConfigError, match=match):
            B.edit_step(tr, *bad)


def test_train_kind_backtrack(tmp_path):
    small = dict(steps=2, ckpt_every=2, batch_size=8, eval_per_depth=4, d_model=32, n_layers=1,
                 n_heads=2, d_mlp=64, threads=1, kind="backtrack", context=384,
                 task=BacktrackConfig(max_depth=5))
    cfg = TrainConfig(**small)
    torch.manual_seed(0)
    net = LlamaForCausalLM(_model_config(cfg))
    batch = _batch_problems(cfg, 0)
    whole = _loss(net, cfg, batch)
    split = _loss(net, TrainConfig(**{**small, "micro_batch": 3}), batch)
    assert abs(whole.item() - split.item()) < 1e-5  # the same mean over the batch's tokens
    folder = train(TrainConfig(**{**small, "micro_batch": 3}), tmp_path, progress=False)
    assert json.loads((folder / "config.json").read_text())["thinklens_task"] == "backtrack"
    m = thinklens.load(str(folder))
    assert m.task is B.BACKTRACK and m.encode("wait")[-1:] == [39]
    assert set(json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])[
        "acc_think"]) == {"1", "2", "3", "4", "5"}


def test_backtrack_steering_identity_and_direction(model):
    st = backtrack_steering(model, layer=3, alphas=(0, 2), n_vector=64, n_eval=32)
    assert st.vector.site == "blocks.3.hook_resid_post" and st.vector.n_label > 0
    # alpha 0 adds nothing: the traces are unsteered sampling's with the same seed
    held = [r["prompt"] for r in B.BACKTRACK.problems(96, depths=(5, 6, 7, 8), seed=0)[64:]]
    plain = model.think_batch(held, temperature=1.0, seed=1, max_new_tokens=256, progress=False)
    assert [t.token_ids for t in plain] == [t.token_ids for t in st.dose.traces[0]]
    assert float(st.corrections[0]) == B.behaviour_rates(plain).corrections
    # measured on 64 traces: 0.83 'wait' sentences per trace unsteered, 3.3 at alpha 2, and
    # 79 % of mistakes corrected (15 % unsteered)
    assert float(st.corrections[1]) > float(st.corrections[0]) + 1.0
    assert float(st.corrected[1]) > float(st.corrected[0]) + 0.2
    with pytest.raises(ConfigError, match="at="):
        backtrack_steering(model, at="everywhere")
