"""thinklens: a mechanistic-interpretability workbench for reasoning models.

Example::

    import thinklens
    model = thinklens.load("organism")                  # bundled; or an HF name / folder / .gguf
    trace = model.think("c = b + 4 ; a = 7 ; b = a - 2 ; ? c")
    cap = model.capture(trace, sites="blocks.*.hook_resid_post", attention="sentence")
    cap["blocks.0.hook_resid_post"].values.shape         # (trace, pos, d_model)
"""

from thinklens import figures, theme
from thinklens.errors import ThinklensError
from thinklens.figures import export
from thinklens.hooks.capture import Capture
from thinklens.hooks.model import ModelConfig, load
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace
from thinklens.hooks.wrapper import Model
from thinklens.plots import (
    plot_attention,
    plot_attribution_scatter,
    plot_circuit,
    plot_faithfulness,
    plot_head_grid,
    plot_patching,
    plot_sentence_attention,
    plot_trace,
)

__version__ = "0.1.0"
__all__ = ["load", "Model", "ModelConfig", "Trace", "Capture", "Store", "ThinklensError",
           "export", "figures", "theme", "plot_attention", "plot_sentence_attention",
           "plot_trace", "plot_patching", "plot_head_grid", "plot_attribution_scatter",
           "plot_circuit", "plot_faithfulness"]
