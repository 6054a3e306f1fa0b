"""The model zoo: the bundled organism, its task, and what it plugs into thinklens.

Importing :mod:`thinklens` registers the organism (:mod:`thinklens.zoo.registry`):
``thinklens.load("organism")`` finds its weights and ``model.task`` is its task. The pair
builders are importable from here::

    from thinklens.zoo import change_constant, lookup_step
    pair = change_constant(model, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c", "a", 3)

The second organism, ``thinklens.load("organism-backtrack")``, whose sampled thinking
detours, errs and backtracks, is :mod:`thinklens.zoo.backtrack` (``sentence_truth``,
``edit_step``, ``behaviour_rates``; its task is :data:`BACKTRACK`).
"""

from thinklens.zoo import backtrack
from thinklens.zoo.backtrack import BACKTRACK, BacktrackTask
from thinklens.zoo.organism import checkpoints, organism_folder, token_truth, training_curve
from thinklens.zoo.pairs import change_constant, change_thinking_value, lookup_step, swap_names
from thinklens.zoo.registry import ORGANISM, OrganismTask, register
from thinklens.zoo.steer_backtrack import BacktrackSteering, backtrack_steering

register()
backtrack.register()

__all__ = ["change_constant", "change_thinking_value", "swap_names", "lookup_step",
           "token_truth", "training_curve", "checkpoints", "organism_folder", "ORGANISM",
           "OrganismTask", "register", "backtrack", "BACKTRACK", "BacktrackTask",
           "BacktrackSteering", "backtrack_steering"]
