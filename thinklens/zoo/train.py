"""Train the organism: a small Llama on the variable-binding task (``thinklens organism train``).

1. Every step draws a fresh batch from the task generator, seeded by ``(seed, step)``, so
   a resumed run sees exactly the batches an uninterrupted one would.
2. Loss is next-token cross-entropy on the completion only (thinking, answer, eos); for
   direct examples only on the answer and eos, so the model never learns to close its
   thinking unasked.
3. Every ``ckpt_every`` steps: weights (safetensors) and the full training state are
   written atomically, and loss plus held-out exact-match accuracy per depth go to
   ``log.jsonl`` (kept inside the training state too, so a kill between the two writes
   loses no row and duplicates none). Held-out accuracy is teacher-forced exact match of the whole
   completion, which equals greedy-generation exact match (greedy decoding reproduces the
   target iff every teacher-forced argmax is right).
4. ``kind`` picks the task: ``"variable-binding"`` (the first organism) or ``"backtrack"``
   (:mod:`thinklens.zoo.backtrack_task`, whose sampled detours and mistakes make the
   thinking vary; its held-out problems carry the plain thinking, which greedy decoding
   should reproduce). ``micro_batch`` > 0 splits each batch, sorted by length, into
   pieces of that size (less padding; the loss is still the mean over the batch's tokens).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from thinklens.errors import ConfigError
from thinklens.hooks._fileio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    replace_durably,
)
from thinklens.zoo import backtrack_task
from thinklens.zoo.task import Problem, TaskConfig, generate
from thinklens.zoo.vocab import SPECIALS, SYMBOLS, build_tokenizer

VOCAB = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}
PAD, BOS, EOS, THINK, END_THINK = (VOCAB[t] for t in
                                   ("<pad>", "<bos>", "<eos>", "<think>", "</think>"))
# kind -> (task config class, generator, extra whole-word tokens)
KINDS = {"variable-binding": (TaskConfig, generate, ()),
         "backtrack": (backtrack_task.BacktrackConfig, backtrack_task.generate,
                       (backtrack_task.WAIT,))}
AnyProblem = Problem | backtrack_task.BacktrackProblem
NEW_FIELDS = {"kind": "variable-binding", "context": 256, "micro_batch": 0, "init_from": "",
              "init_step": 0}  # the defaults of runs made before these fields


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2500
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 300
    weight_decay: float = 0.01
    direct_frac: float = 0.2
    ckpt_every: int = 250
    eval_per_depth: int = 200
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 384
    threads: int = 1
    task: Any = None            # the kind's config class; None = its defaults
    kind: str = "variable-binding"
    context: int = 256
    micro_batch: int = 0
    init_from: str = ""   # a checkpoint folder to start from (a second training phase)
    init_step: int = 0    # its step: this run's steps, checkpoints and batches count on

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}; valid: {', '.join(KINDS)}")
        klass = KINDS[self.kind][0]
        if self.task is None:
            self.task = klass()
        elif isinstance(self.task, dict):
            self.task = klass(**{k: tuple(v) if k == "ops" else v
                                 for k, v in self.task.items()})
        for name in ("steps", "batch_size", "ckpt_every", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


def _vocab(kind: str) -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS + list(KINDS[kind][2]))}


def _model_config(cfg: TrainConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(_vocab(cfg.kind)), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.context, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        rope_theta=10000.0, attention_bias=False, mlp_bias=False,
    )


def _encode(p: AnyProblem, vocab: dict[str, int] = VOCAB) -> tuple[list[int], int]:
    """Token ids of the full sequence and the index of the first completion token."""
    prompt = [BOS] + [vocab[t] for t in p.prompt_tokens()] + [THINK]
    return prompt + [vocab[t] for t in p.completion.split()], len(prompt)


def _make_batch(problems: list[AnyProblem], vocab: dict[str, int] = VOCAB
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [b, T], attention_mask [b, T], labels [b, T])``, right-padded."""
    rows = [_encode(p, vocab) for p in problems]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, ((seq, start), p) in enumerate(zip(rows, problems)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start: len(seq)] = ids[i, start: len(seq)]
        # not targets: a forced "</think>" (direct answers, early exits), filler
        skip = p.unlabelled() if hasattr(p, "unlabelled") else ({0} if p.direct else set())
        for k in skip:
            labels[i, start + k] = -100
    return ids, mask, labels


def _batch_problems(cfg: TrainConfig, step: int) -> list[AnyProblem]:
    rng = random.Random(cfg.seed * 1_000_003 + cfg.init_step + step)
    gen = KINDS[cfg.kind][1]
    return [gen(rng, cfg.task, direct=rng.random() < cfg.direct_frac)
            for _ in range(cfg.batch_size)]


def _heldout(cfg: TrainConfig, depth: int, n: int, direct: bool = False) -> list[AnyProblem]:
    """Held-out problems: a seed stream disjoint from training's (negative offsets).

    Backtrack problems carry the plain thinking (no detour, no mistake): the one greedy
    decoding should write."""
    rng = random.Random(-(cfg.seed * 7919 + depth * 104729 + int(direct) + 1))
    task = cfg.task if cfg.kind == "variable-binding" else replace(
        cfg.task, p_detour=0.0, p_mistake=0.0, p_early=0.0, p_filler=0.0)
    return [KINDS[cfg.kind][1](rng, task, depth=depth, direct=direct) for _ in range(n)]


def _loss(model: LlamaForCausalLM, cfg: TrainConfig, problems: list) -> torch.Tensor:
    """Mean next-token loss over the batch's labelled tokens (micro-batched if asked)."""
    vocab = _vocab(cfg.kind)
    if cfg.micro_batch <= 0:
        ids, mask, labels = _make_batch(problems, vocab)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    order = sorted(problems, key=lambda p: len(_encode(p, vocab)[0]))
    pieces = [_make_batch(order[i: i + cfg.micro_batch], vocab)
              for i in range(0, len(order), cfg.micro_batch)]
    total = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in pieces)
    loss = torch.zeros(())
    for ids, mask, labels in pieces:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = loss + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum") / total
    return loss


@torch.no_grad()
def _exact_match(model: LlamaForCausalLM, problems: list[AnyProblem], chunk: int = 250,
                 vocab: dict[str, int] = VOCAB) -> float:
    """Fraction of problems whose whole completion is reproduced by greedy decoding."""
    hits = 0
    for i in range(0, len(problems), chunk):
        ids, mask, labels = _make_batch(problems[i: i + chunk], vocab)
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = (pred == target) | (target == -100)
        hits += int(ok.all(dim=1).sum())
    return hits / max(1, len(problems))


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_log(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_weights(model: LlamaForCausalLM, folder: Path, dtype: torch.dtype = torch.float32,
                 kind: str = "variable-binding") -> None:
    """HF-loadable folder (config + safetensors + tokenizer), written atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.thinklens_task = kind  # marks the organism (segmentation, its task)
    model.config.to_json_file(str(tmp / "config.json"))
    build_tokenizer(KINDS[kind][2]).save_pretrained(str(tmp))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    replace_durably(tmp, folder)


def train(cfg: TrainConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Train (or resume) into ``out``; returns the folder of the final weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if cfg_path.exists():
        saved = {**NEW_FIELDS, **json.loads(cfg_path.read_text())}
        if saved != json.loads(json.dumps(asdict(cfg))):
            raise ConfigError(f"{out} holds a run with another config ({cfg_path}); "
                              "resume with the same settings or choose a new --out")
    else:
        atomic_write_json(cfg_path, asdict(cfg), indent=1)
    torch.set_num_threads(cfg.threads)  # fixed: float sums depend on the thread count
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_model_config(cfg))
    if cfg.init_from:
        model.load_state_dict(load_file(str(Path(cfg.init_from) / "model.safetensors")))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.weight_decay)
    state_path, log_path = out / "state.pt", out / "log.jsonl"
    step, rows = 0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if "log" in state:
            rows = json.loads(state["log"])
        elif log_path.exists():  # states written before the log moved inside them
            rows = [r for r in map(json.loads, log_path.read_text().splitlines())
                    if r["step"] <= step]
        _write_log(log_path, rows)  # the state is the truth: drop rows written after it
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="organism train", disable=not progress)
    losses: list[float] = []
    t0 = time.time()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        loss = _loss(model, cfg, _batch_problems(cfg, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            model.eval()
            vocab = _vocab(cfg.kind)
            acc = {d: _exact_match(model, _heldout(cfg, d, cfg.eval_per_depth), vocab=vocab)
                   for d in range(cfg.task.min_depth, cfg.task.max_depth + 1)}
            direct = {d: _exact_match(model, _heldout(cfg, d, cfg.eval_per_depth, True),
                                      vocab=vocab)
                      for d in range(cfg.task.min_depth, cfg.task.max_depth + 1)}
            model.train()
            row = {"step": cfg.init_step + step, "loss": sum(losses) / max(1, len(losses)),
                   "lr": _lr_at(cfg, step - 1), "acc_think": acc, "acc_direct": direct,
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            save_weights(model, out / f"step-{cfg.init_step + step:06d}", kind=cfg.kind)
            _atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(),
                                "step": step, "torch_rng": torch.get_rng_state(),
                                "log": json.dumps(rows)}, state_path)
            _write_log(log_path, rows)
            bar.write(f"step {cfg.init_step + step}: loss {row['loss']:.4f} think {acc} direct {direct}")
            losses = []
    bar.close()
    return out / f"step-{cfg.init_step + cfg.steps:06d}"


def ship(run: Path, dest: Path, steps: list[int], final: int | None = None) -> None:
    """Copy a run's final weights and chosen checkpoints into ``dest`` as float16.

    Also writes ``curve.json`` (the run's log.jsonl as a list) and ``train_config.json``.
    A run started from another run's checkpoint (``init_from``, followed back through every
    earlier phase) finds earlier steps' checkpoints in those runs, and its curve starts with
    their rows, each up to the ``init_step`` of the phase that followed it.
    """
    from transformers import AutoModelForCausalLM

    cfg = json.loads((run / "train_config.json").read_text())
    final = final if final is not None else cfg.get("init_step", 0) + cfg["steps"]
    runs, cfgs = [run], [cfg]
    while cfgs[-1].get("init_from") and len(runs) < 16:
        runs.append(Path(cfgs[-1]["init_from"]).parent)
        cfgs.append(json.loads((runs[-1] / "train_config.json").read_text()))

    def folder(s: int) -> Path | None:
        return next((r / f"step-{s:06d}" for r in runs if (r / f"step-{s:06d}").exists()), None)

    missing = [s for s in [*steps, final] if folder(s) is None]
    if missing:
        have = sorted(int(p.name[5:]) for r in runs for p in r.glob("step-*")
                      if p.name[5:].isdigit())
        raise ConfigError(f"run {run} has no checkpoint at steps {missing}; it has {have}")
    dest.mkdir(parents=True, exist_ok=True)
    targets = [(final, dest / "final")] + [(s, dest / "checkpoints" / f"step-{s:06d}")
                                           for s in steps]
    if (dest / "checkpoints").exists():
        for old in (dest / "checkpoints").iterdir():
            if old.name not in {t.name for _, t in targets}:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    for step, target in targets:
        model = AutoModelForCausalLM.from_pretrained(str(folder(step)))
        target.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, target, dtype=torch.float16,
                     kind=cfg.get("kind", "variable-binding"))
    rows: list[dict] = []
    for r, later in zip(runs[::-1], [*cfgs[::-1][1:], None]):   # oldest phase first
        mine = [json.loads(x) for x in (r / "log.jsonl").read_text().splitlines() if x]
        rows += [x for x in mine if later is None or x["step"] <= later["init_step"]]
    atomic_write_json(dest / "curve.json", rows, indent=0)
    atomic_write_json(dest / "train_config.json", cfg, indent=1)


__all__ = ["KINDS", "TrainConfig", "save_weights", "train", "ship"]
