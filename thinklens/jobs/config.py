"""The configuration file of a batch probing study (``thinklens probe STUDY.toml``).

Every section and key, with its default (``REQUIRED`` keys have none)::

    out = "runs/study"                  # output folder, relative to this file (REQUIRED)

    [model]
    spec = "organism"                   # "organism", a Hugging Face name, a folder, a .gguf
    device = "cpu"                      # default: cuda when there is one
    checkpoint = 1000                   # organism only: a shipped training checkpoint

    [prompts]                           # exactly one of file / organism
    file = "prompts.jsonl"              # {"prompt": ..., "id": ..., any other keys} per line
    organism = {n = 64, depths = [2, 3, 4], seed = 1}   # held-out organism problems

    [generate]
    max_new_tokens = 256
    temperature = 0.0                   # 0: greedy
    seed = 0
    batch_size = 64                     # prompts per generation batch (see below)

    [capture]
    sites = ["blocks.*.hook_resid_post"]
    positions = "thinking"              # all | thinking | sentence_ends | last | prompt | answer …
    dtype = "float32"                   # float32 | float16 | bfloat16
    batch_size = 8
    chunk = 32                          # prompts per resumable round
    budget = "8GB"                      # default: 60% of available memory

    [[probe]]                           # one table per probe (at least one)
    name = "value"                      # REQUIRED: names its results and figures
    labels = "organism.value"           # REQUIRED: see thinklens.jobs.labels
    sites = "blocks.*.hook_resid_post"  # default: every captured site
    positions = [0]                     # int offsets from the labelled token (or selectors)
    kind = "logistic"                   # logistic | ridge | mlp
    task = "auto"                       # auto | classification | regression (see below)
    l2 = 1.0
    class_weight = "balanced"           # default: none
    control = true
    n_boot = 200
    test_frac = 0.25
    seed = 0

    [output]
    figures = ["html"]                  # html | svg | pdf | png (pdf/svg/png need Chromium)

A probe's ``task``: ``"auto"`` makes numeric labels regression targets under
``kind = "ridge"`` (a ridge probe of ``field:KEY`` integers predicts the number) and
classes otherwise (integers under ``logistic``/``mlp`` are classes, as are strings);
``"classification"`` or ``"regression"`` say so outright. A regression probe's
selectivity is R² - max(control R², 0) (:mod:`thinklens.probes.sweeps`).

Unknown sections or keys, wrong types and values outside the allowed set are refused
before anything runs, with the key, the bad value and the valid choices. A label name is
checked against the model's task when ``[model] spec`` names a registered one (``"organism"``);
for other models a ``TASK.KEY`` name is checked after the model is loaded, still before any
generation.

Resuming into an existing ``out`` folder requires the same ``[model]``, ``[prompts]``,
``[generate]`` and ``[capture]`` settings, except those in :data:`SCHEDULE_KEYS`, which
only change how the work is batched: ``generate.batch_size`` (with greedy decoding, which
prompts share a ``generate`` call does not change their traces; prompts of equal length
are batched without padding) — with ``temperature > 0`` it changes which random draws a
trace gets, so there it must stay the same.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError, did_you_mean
from thinklens.hooks.positions import POSITION_SELECTORS
from thinklens.hooks.task import task_named

from . import labels as _labels

REQUIRED = object()
KINDS = ("logistic", "ridge", "mlp")
TASKS = ("auto", "classification", "regression")
DTYPES = ("float32", "float16", "bfloat16")
FIGURES = ("html", "svg", "pdf", "png")
SCHEDULE_KEYS = ("generate.batch_size",)  # greedy only: see the module docstring

# section -> key -> (types, default, allowed values or None)
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {"out": ((str,), REQUIRED, None)},
    "model": {"spec": ((str,), "organism", None), "device": ((str,), None, None),
              "checkpoint": ((int,), None, None)},
    "prompts": {"file": ((str,), None, None), "organism": ((dict,), None, None)},
    "generate": {"max_new_tokens": ((int,), 256, None), "temperature": ((float, int), 0.0, None),
                 "seed": ((int,), 0, None), "batch_size": ((int,), 64, None)},
    "capture": {"sites": ((list, str), ["blocks.*.hook_resid_post"], None),
                "positions": ((str,), "thinking", POSITION_SELECTORS),
                "dtype": ((str,), "float32", DTYPES), "batch_size": ((int,), 8, None),
                "chunk": ((int,), 32, None), "budget": ((str,), None, None)},
    "probe": {"name": ((str,), REQUIRED, None), "labels": ((str,), REQUIRED, None),
              "sites": ((list, str), None, None), "positions": ((list,), [0], None),
              "kind": ((str,), "logistic", KINDS), "task": ((str,), "auto", TASKS),
              "l2": ((float, int), 1.0, None),
              "class_weight": ((str,), None, ("balanced",)), "control": ((bool,), True, None),
              "n_boot": ((int,), 200, None), "test_frac": ((float,), 0.25, None),
              "seed": ((int,), 0, None)},
    "output": {"figures": ((list,), ["html"], None)},
}
ORGANISM_PROMPTS = {"n": 64, "depths": [1, 2, 3, 4], "seed": 1}


def _check(where: str, key: str, value: Any, spec: tuple) -> Any:
    types, _, allowed = spec
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                             "list": "a list", "dict": "a table", "bool": "true/false"}[t.__name__]
                            for t in types)
        raise ConfigError(f"{where}: key {key!r} must be {names}, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where}: key {key!r} is {value!r}.{did_you_mean(str(value), allowed)} "
                          f"Allowed values: {', '.join(allowed)}")
    if isinstance(value, int) and not isinstance(value, bool) and key in (
            "max_new_tokens", "batch_size", "chunk", "n_boot") and value < 1:
        raise ConfigError(f"{where}: key {key!r} must be at least 1, got {value}")
    return value


def _table(where: str, given: Any, schema: dict[str, tuple]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ConfigError(f"{where} must be a table ([{where}] in TOML), got {given!r}")
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], schema)}"
                          f" Allowed keys: {', '.join(schema)}")
    out = {}
    for key, spec in schema.items():
        if key in given:
            out[key] = _check(where, key, given[key], spec)
        elif spec[1] is REQUIRED:
            raise ConfigError(f"{where}: required key {key!r} is missing")
        else:
            out[key] = spec[1]
    return out


def _registered_task(spec: str):
    """The task registered under the model spec's name (``"organism"``), else ``None``."""
    try:
        return task_named(spec)
    except ConfigError:
        return None


def parse(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Validate a parsed TOML document; paths are made absolute against ``base``."""
    sections = [s for s in SCHEMA if s]
    unknown = [k for k in raw if k not in sections and k not in SCHEMA[""]]
    if unknown:
        raise ConfigError(f"unknown section or key {unknown[0]!r}."
                          f"{did_you_mean(unknown[0], [*sections, 'out'])} Sections: "
                          f"{', '.join(sections)}; top-level keys: out")
    cfg = _table("the top level", {k: v for k, v in raw.items() if k in SCHEMA[""]}, SCHEMA[""])
    for section in sections:
        if section == "probe":
            continue
        cfg[section] = _table(f"[{section}]", raw.get(section, {}), SCHEMA[section])
    probes = raw.get("probe")
    if not isinstance(probes, list) or not probes:
        raise ConfigError("no [[probe]] table: add at least one, e.g.\n[[probe]]\nname = "
                          "\"value\"\nlabels = \"organism.value\"")
    cfg["probe"] = [_table(f"[[probe]] number {i + 1}", p, SCHEMA["probe"])
                    for i, p in enumerate(probes)]
    names = [p["name"] for p in cfg["probe"]]
    dup = [n for n in names if names.count(n) > 1 or not n.replace("-", "").replace("_", "")
           .isalnum()]
    if dup:
        raise ConfigError(f"[[probe]] name {dup[0]!r} is repeated or not a plain name; give each "
                          "probe a unique name of letters, digits, '-' and '_'")
    task = _registered_task(cfg["model"]["spec"])
    for i, q in enumerate(cfg["probe"]):
        try:
            _labels.check(q["labels"], task, task_known=task is not None)
        except ConfigError as e:
            raise ConfigError(f"[[probe]] number {i + 1} ({q['name']!r}), key 'labels': {e}"
                              ) from None
    p = cfg["prompts"]
    if (p["file"] is None) == (p["organism"] is None):
        raise ConfigError("[prompts]: give exactly one of 'file' (a JSONL of prompts) or "
                          "'organism' (e.g. organism = {n = 64, depths = [2, 3, 4]})")
    if p["file"] is not None:
        p["file"] = str((base / p["file"]).resolve())
    else:
        bad = [k for k in p["organism"] if k not in ORGANISM_PROMPTS]
        if bad:
            raise ConfigError(f"[prompts] organism: unknown key {bad[0]!r}; allowed: "
                              f"{', '.join(ORGANISM_PROMPTS)}")
        p["organism"] = {**ORGANISM_PROMPTS, **p["organism"]}
    for fig in cfg["output"]["figures"]:
        if fig not in FIGURES:
            raise ConfigError(f"[output]: key 'figures' has {fig!r}.{did_you_mean(str(fig), FIGURES)}"
                              f" Allowed values: {', '.join(FIGURES)}")
    sites = cfg["capture"]["sites"]
    cfg["capture"]["sites"] = [sites] if isinstance(sites, str) else sites
    if not 0 < cfg["probe"][0]["test_frac"] < 1 or any(not 0 < q["test_frac"] < 1
                                                        for q in cfg["probe"]):
        raise ConfigError("[[probe]]: key 'test_frac' must be between 0 and 1 (exclusive)")
    cfg["out"] = str((base / cfg["out"]).resolve())
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a study file; see the module docstring for its keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see `thinklens probe "
                          "--help` for an example")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    return parse(raw, path.resolve().parent)


EXAMPLE = """example STUDY.toml (every key: python -c 'import thinklens.jobs.config as c; help(c)'):

  out = "runs/value-study"              # relative to the TOML file
  [model]
  spec = "organism"                     # or a Hugging Face name / folder / .gguf
  [prompts]
  organism = {n = 64, depths = [2, 3, 4]}   # or: file = "prompts.jsonl"
  [generate]
  max_new_tokens = 96
  [capture]
  sites = ["blocks.*.hook_resid_post"]
  positions = "thinking"
  [[probe]]
  name = "value"
  labels = "organism.value"             # organism.answer | organism.variable | answer | tag | field:KEY
  [output]
  figures = ["html", "svg"]

The summary reports each probe's best (position, site) cell, chosen on the test split
(results.json: "selected_on": "test"); the whole grid is in results/NAME.json.
"""


__all__ = ["parse", "load_config", "SCHEDULE_KEYS", "EXAMPLE"]
