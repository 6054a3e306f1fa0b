"""Probe figures show the result's numbers, with token strings on the logit-lens axis."""

from __future__ import annotations

import pytest
import torch

from thinklens import probes
from thinklens.errors import ConfigError
from thinklens.plots import (
    plot_dose_response,
    plot_early_exit,
    plot_logit_lens,
    plot_probe_by_layer,
    plot_training_curve,
)
from thinklens.zoo.evaluate import heldout_problems
from thinklens.zoo.organism import token_truth, training_curve


@pytest.fixture(scope="module")
def traces(organism):
    prompts = [p.prompt for d in (2, 3) for p in heldout_problems(d, 30, seed=99)]
    return organism.think_batch(prompts, max_new_tokens=70)


def test_probe_by_layer_shows_sweep_numbers(organism, traces):
    cap = organism.capture(traces, sites="blocks.*.hook_resid_post")
    truth = [token_truth(t) for t in traces]

    def label(i, tr, k):
        t = truth[i][k + 1] if k + 1 < len(tr) else None
        return t.value if t and t.role == "result" else None

    res = probes.sweep(cap, "blocks.*.hook_resid_post", label, n_boot=50)
    fig = plot_probe_by_layer(res)
    assert list(fig.data[0].x) == res.sites
    torch.testing.assert_close(torch.tensor(fig.data[0].y, dtype=torch.float32),
                               res.metrics[res.main_metric][0].float())
    assert fig.data[1].name.startswith("control")
    assert max(fig.data[0].y) >= 0.95  # the organism computes the value by layer 1
    with pytest.raises(ConfigError, match="valid"):
        plot_probe_by_layer(res, "nope")


def test_logit_lens_figure_has_token_axis(organism, traces):
    lens = probes.logit_lens(organism, traces[:2])
    fig = plot_logit_lens(lens, 0)
    n = int(lens.lengths[0])
    assert list(fig.layout.xaxis.ticktext) == lens.tokens[0][:n]
    assert len(fig.data[0].z) == len(lens.layers)
    with pytest.raises(ConfigError, match="'prob', 'rank'"):
        plot_logit_lens(lens, 0, value="logit")


def test_curves_from_dataclasses():
    from thinklens.probes import early_exit_curve
    from thinklens.probes.steering import DoseResponse

    curve = early_exit_curve([torch.tensor([0.2, 0.9]), torch.tensor([0.6, 0.7])],
                             [torch.tensor([False, True]), torch.tensor([True, True])],
                             [torch.tensor([5, 10]), torch.tensor([4, 8])], [10, 8],
                             [True, True])
    fig = plot_early_exit(curve)
    assert len(fig.data[0].x) == len(curve.thresholds)
    dose = DoseResponse(alphas=torch.tensor([0.0, 1.0]), frequency=torch.tensor([0.1, 0.5]),
                        accuracy=torch.tensor([1.0, 0.5]),
                        thinking_tokens=torch.tensor([30.0, 20.0]), metric_name="7s")
    fig = plot_dose_response(dose)
    assert list(fig.data[0].y) == [pytest.approx(0.1), pytest.approx(0.5)]
    assert plot_training_curve(training_curve()).data[0].name == "loss"
