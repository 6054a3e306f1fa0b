"""thinklens.circuits: activation patching (batched), path patching, clean/corrupt pairs.

Attribution patching (AtP, EAP, EAP-IG) and circuit graphs are not built yet.
"""

from thinklens.circuits.metrics import Metric, answer_prob, kl_to, logit_diff, normalized
from thinklens.circuits.pairs import Pair, change_constant, change_thinking_value, make_pair
from thinklens.circuits.patching import SITE_KINDS, PatchResult, patch
from thinklens.circuits.paths import path_patch

__all__ = ["patch", "path_patch", "PatchResult", "make_pair", "Pair", "change_constant",
           "change_thinking_value", "logit_diff", "answer_prob", "kl_to", "normalized",
           "Metric", "SITE_KINDS"]
