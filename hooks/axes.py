"""The axis vocabulary: one name per kind of tensor axis, everywhere in thinklens.

Every jaxtyping annotation (``Float[Tensor, "trace pos d_model"]``) and every result's
``axes`` tuple uses these names; ``tests/test_architecture.py`` checks the annotations.
"""

from __future__ import annotations

AXES: dict[str, str] = {
    # model and trace axes
    "trace": "one reasoning trace of a batch of traces",
    "batch": "one row of a forward pass's padded batch",
    "pos": "a token position of a trace (a query position where attention is concerned)",
    "query_pos": "the attending token of an attention pattern",
    "key_pos": "the attended-to token of an attention pattern",
    "layer": "a transformer block (or the embeddings, where named so)",
    "head": "a query head of a block's attention",
    "kv_head": "a key/value head (grouped-query attention shares one among several heads)",
    "d_model": "the residual stream's features",
    "d_head": "one head's q, k, v or z features",
    "d_mlp": "an MLP's hidden features",
    "d_vocab": "the vocabulary (logits)",
    "one": "a site's single feature (e.g. a norm's scale)",
    "sentence": "a thinking sentence",
    "cut": "a cut point of the thinking: before its first sentence, then after each sentence",
    "answer": "one answer of an answer distribution (a candidate answer, or all others)",
    "query_sentence": "the attending sentence of a sentence x sentence attention matrix",
    "key_sentence": "the attended-to sentence of a sentence x sentence attention matrix",
    # analyses
    "site": "one hook site (a feature set) of a probe sweep",
    "position": "one read-out position of a probe sweep (a selector or a token offset)",
    "n": "one row (example) of a probe data set",
    "n_train": "one training row",
    "n_test": "one test row",
    "d": "a probe's input features",
    "d_in": "the inputs of a probe's output layer (d, or hidden for an MLP probe)",
    "hidden": "an MLP probe's hidden units",
    "logit": "a probe's outputs (one per class, or one for regression)",
    "class": "a class of a classification probe",
    "label_set": "one of the label sets a sweep fits at once (real labels, the control)",
    "boot": "one bootstrap resample",
    "bin": "a bin of positions along the thinking",
    "threshold": "a confidence threshold of early exit",
    "alpha": "a steering strength",
    "sender": "an edge's sending node (input, head output, MLP output)",
    "receiver": "an edge's receiving node (head q/k/v input, MLP input, logits)",
    "size": "a circuit size (number of edges kept)",
}

__all__ = ["AXES"]
