"""thinklens.probes: probe data sets, batched linear probes and sweeps, the logit lens,
"when does it know" answer probes, answer-correctness probes with early exit, and
steering vectors.

Figures of these results are in :mod:`thinklens.plots`. Whole studies run from a TOML file
with ``thinklens probe STUDY.toml`` (:mod:`thinklens.jobs.study`, config keys in
:mod:`thinklens.jobs.config`, named labels in :mod:`thinklens.jobs.labels`).
"""

from thinklens.probes import metrics
from thinklens.probes.correctness import (
    CorrectnessResult,
    EarlyExitCurve,
    chunk_thinking,
    correctness_probe,
    early_exit_curve,
)
from thinklens.probes.data import (
    ProbeData,
    class_balance,
    group_split,
    probe_data,
    probe_data_at,
    split_traces,
)
from thinklens.probes.lens import (
    AnswerProbeResult,
    LensResult,
    answer_probe,
    lens_logits,
    logit_lens,
)
from thinklens.probes.linear import ProbeResult, fit_probe
from thinklens.probes.steering import (
    DoseResponse,
    SteeringVector,
    dose_response,
    steer,
    steering_vector,
)
from thinklens.probes.sweeps import SweepResult, sweep

__all__ = ["ProbeData", "probe_data", "probe_data_at", "split_traces", "group_split",
           "class_balance", "fit_probe", "ProbeResult",
           "sweep", "SweepResult", "metrics", "logit_lens", "lens_logits", "LensResult",
           "answer_probe", "AnswerProbeResult", "correctness_probe", "CorrectnessResult",
           "early_exit_curve", "EarlyExitCurve", "chunk_thinking", "steering_vector",
           "SteeringVector", "steer", "dose_response", "DoseResponse"]
