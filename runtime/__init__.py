"""dgguf.runtime: load a DiffusionGemma GGUF and generate (Model), and the sampler's acceptance rule."""
from .model import GenerationResult, GenerationStats, Model
from .sampler import entropy_bound_accept

__all__ = ["Model", "GenerationResult", "GenerationStats", "entropy_bound_accept"]
