"""thinklens.hooks: load models, trace their thinking, capture activations, store them."""

from thinklens.hooks.activations import SiteActivations
from thinklens.hooks.capture import Capture, trace_id
from thinklens.hooks.gguf import header_tokenizer
from thinklens.hooks.model import load
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Sentence, Span, Trace
from thinklens.hooks.wrapper import Model, ModelConfig

__all__ = ["load", "Model", "ModelConfig", "Trace", "Span", "Sentence", "Capture",
           "Store", "SiteActivations", "trace_id", "header_tokenizer"]
