"""thinklens.circuits: activation patching (batched), path patching, clean/corrupt pairs,
attribution patching (AtP, EAP, EAP-IG) and circuits with their faithfulness.

Example::

    from thinklens.circuits import patch, atp, eap, faithfulness_curve
    pair = model.task.pair("change_constant", model, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c", "a", 3)
    exact = patch(model, pair, "z", by=("layer", "head"))     # one patched run per head
    approx = atp(model, pair, "z", by=("layer", "head"))      # one forward + one backward
    full = eap(model, pair, steps=5)                          # EAP-IG score of every edge
    circuit = full.top(n=40)
    circuit.faithfulness(model, pair)                         # share of the metric recovered
    curve = faithfulness_curve(model, pair, full)             # against the number of edges
"""

from thinklens.circuits.anchors import ForcedAnswer, forced_answer
from thinklens.circuits.anchors_attention import SuppressionResult, suppression
from thinklens.circuits.anchors_attribution import SentenceAttribution, sentence_attribution
from thinklens.circuits.anchors_resampling import (
    Resampling,
    embedding_comparator,
    exact_comparator,
    resampling,
)
from thinklens.circuits.anchors_total import SuppressionTotal, suppression_total
from thinklens.circuits.attribution import AttributionResult, atp, eap
from thinklens.circuits.circuit import Circuit, FaithfulnessCurve, faithfulness_curve
from thinklens.circuits.faithfulness import (
    AddedMistake,
    EarlyAnswering,
    FillerTokens,
    Paraphrase,
    added_mistake,
    early_answering,
    filler_tokens,
    paraphrase,
)
from thinklens.circuits.graph import Graph
from thinklens.circuits.heads import HeadScores, ICLScore, head_scores, icl_score, reference_traces
from thinklens.circuits.metrics import Metric, answer_prob, kl_to, logit_diff, normalized
from thinklens.circuits.pairs import Pair, counterfactual_pair, make_pair
from thinklens.circuits.patching import SITE_KINDS, PatchResult, patch
from thinklens.circuits.paths import path_patch
from thinklens.circuits.receivers import ReceiverHeads, fisher_kurtosis, receiver_heads

__all__ = ["patch", "path_patch", "PatchResult", "make_pair", "counterfactual_pair", "Pair", "logit_diff", "answer_prob", "kl_to", "normalized",
           "Metric", "SITE_KINDS", "atp", "eap", "AttributionResult", "Circuit", "Graph",
           "FaithfulnessCurve", "faithfulness_curve",
           "head_scores", "HeadScores", "icl_score", "ICLScore", "reference_traces",
           "receiver_heads", "ReceiverHeads", "fisher_kurtosis", "suppression",
           "SuppressionResult", "suppression_total", "SuppressionTotal",
           "sentence_attribution", "SentenceAttribution",
           "forced_answer", "ForcedAnswer", "resampling", "Resampling", "exact_comparator",
           "embedding_comparator", "early_answering", "EarlyAnswering", "filler_tokens",
           "FillerTokens", "added_mistake", "AddedMistake", "paraphrase", "Paraphrase"]
