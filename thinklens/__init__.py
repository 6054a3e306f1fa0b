"""thinklens: a mechanistic-interpretability workbench for reasoning models.

Example::

    import thinklens
    model = thinklens.load("organism")                  # bundled; or an HF name / folder / .gguf
    trace = model.think("c = b + 4 ; a = 7 ; b = a - 2 ; ? c")
    cap = model.capture(trace, sites="blocks.*.hook_resid_post", attention="sentence")
    cap["blocks.0.hook_resid_post"].values.shape         # (trace, pos, d_model)
"""

from thinklens import figures, theme, zoo  # zoo: registers the bundled models and tasks
from thinklens.errors import ThinklensError
from thinklens.figures import export
from thinklens.hooks.capture import Capture
from thinklens.hooks.model import load
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace
from thinklens.hooks.wrapper import Model, ModelConfig
from thinklens.plots import (
    plot_attention,
    plot_attribution_scatter,
    plot_checkpoint_heads,
    plot_circuit,
    plot_dose_response,
    plot_dynamics,
    plot_early_answering,
    plot_early_exit,
    plot_faithfulness,
    plot_head_grid,
    plot_head_scores,
    plot_logit_lens,
    plot_patching,
    plot_probe_by_layer,
    plot_probe_grid,
    plot_receiver_kurtosis,
    plot_sentence_attention,
    plot_sentence_importance,
    plot_suppression_matrix,
    plot_trace,
    plot_training_curve,
)

__version__ = "0.1.0"
__all__ = ["load", "Model", "ModelConfig", "Trace", "Capture", "Store", "ThinklensError",
           "export", "figures", "theme", "zoo", "plot_attention", "plot_sentence_attention",
           "plot_trace", "plot_training_curve", "plot_probe_by_layer", "plot_probe_grid",
           "plot_logit_lens", "plot_early_exit", "plot_dose_response", "plot_patching",
           "plot_head_grid", "plot_attribution_scatter", "plot_circuit", "plot_faithfulness",
           "plot_head_scores", "plot_checkpoint_heads", "plot_dynamics",
           "plot_sentence_importance", "plot_suppression_matrix", "plot_receiver_kurtosis",
           "plot_early_answering"]
