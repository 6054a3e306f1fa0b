"""thinklens.hooks: load models, trace their thinking, capture activations, store them."""

from thinklens.hooks.activations import SiteActivations
from thinklens.hooks.capture import Capture, capture, trace_id
from thinklens.hooks.model import ModelConfig, load
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Sentence, Span, Trace
from thinklens.hooks.wrapper import Model

__all__ = ["load", "Model", "ModelConfig", "Trace", "Span", "Sentence", "capture", "Capture",
           "Store", "SiteActivations", "trace_id"]
