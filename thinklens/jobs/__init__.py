"""thinklens.jobs: batch jobs above the analyses — the resumable capture journal, probe
studies from a TOML file, and the small jobs of the command line.

- :mod:`thinklens.jobs.journal` — :func:`run_capture` (think + capture in resumable,
  journaled rounds), :func:`read_prompts` / :func:`read_jsonl` (JSONL prompt files).
- :mod:`thinklens.jobs.traces` — :func:`run_think` (``thinklens think``: prompts into a
  JSONL traces file, N samples per prompt, resumable), :func:`read_traces` (a traces
  file, checked line by line; ``thinklens capture --traces``).
- :mod:`thinklens.jobs.study` — :func:`run_study` (``thinklens probe STUDY.toml``: traces,
  capture, sharding under torchrun, probes, figures, summary); its file format is
  :mod:`thinklens.jobs.config`, its named labels :mod:`thinklens.jobs.labels`.
- :mod:`thinklens.jobs.commands` — ``demo``, ``think``, ``capture``, ``site_names``.
- :mod:`thinklens.jobs.dynamics` — :func:`run_dynamics` (one measure — head scores, the
  ICL score, a probe sweep, a circuit's faithfulness — over a model's training
  checkpoints, one model at a time, resumable; ``thinklens dynamics``).
- :mod:`thinklens.jobs.anchors` — :func:`run_anchors` (``thinklens anchors``: the
  thought-anchor sentence measures over a traces file, one line per trace, resumable),
  :func:`read_anchors`.

Jobs report progress through tqdm bars and an optional ``log`` callable; they never print.
:mod:`thinklens.cli` parses arguments, calls one job and prints what it returns.
"""

from thinklens.jobs.anchors import read_anchors, run_anchors
from thinklens.jobs.config import load_config
from thinklens.jobs.dynamics import heads_measure, icl_measure, run_dynamics
from thinklens.jobs.journal import read_jsonl, read_prompts, run_capture
from thinklens.jobs.study import run_study
from thinklens.jobs.traces import read_traces, run_think

__all__ = ["run_capture", "read_prompts", "read_jsonl", "run_study", "load_config",
           "run_think", "read_traces", "run_dynamics", "heads_measure", "icl_measure",
           "run_anchors", "read_anchors"]
