"""thinklens.plots: figures of traces and attention; each takes data and returns a go.Figure.

Nothing here shows a figure or writes a file: call ``fig.show()`` in a notebook, or
:func:`thinklens.figures.export` for a paper. Every figure uses :mod:`thinklens.theme`.
"""

from thinklens.plots.anchors import (
    plot_early_answering,
    plot_receiver_kurtosis,
    plot_sentence_importance,
    plot_suppression_matrix,
)
from thinklens.plots.attention import plot_attention, plot_sentence_attention
from thinklens.plots.circuits import plot_circuit, plot_faithfulness
from thinklens.plots.dynamics import plot_checkpoint_heads, plot_dynamics, plot_head_scores
from thinklens.plots.patching import plot_attribution_scatter, plot_head_grid, plot_patching
from thinklens.plots.probes import (
    plot_dose_response,
    plot_early_exit,
    plot_logit_lens,
    plot_probe_by_layer,
    plot_probe_grid,
)
from thinklens.plots.trace import plot_trace
from thinklens.plots.training import plot_training_curve

__all__ = ["plot_attention", "plot_sentence_attention", "plot_trace", "plot_training_curve",
           "plot_probe_by_layer", "plot_probe_grid", "plot_logit_lens", "plot_early_exit",
           "plot_dose_response", "plot_patching", "plot_head_grid", "plot_attribution_scatter",
           "plot_circuit", "plot_faithfulness", "plot_head_scores", "plot_checkpoint_heads",
           "plot_dynamics", "plot_sentence_importance",
           "plot_suppression_matrix", "plot_receiver_kurtosis", "plot_early_answering"]
