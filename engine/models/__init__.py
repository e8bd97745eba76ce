"""Model registry: family name (from config.architectures) -> model class."""

from engine.models.llama import LlamaForCausalLM
from engine.models.llama4 import Llama4ForCausalLM

MODELS = {"llama4": Llama4ForCausalLM, "llama": LlamaForCausalLM}
