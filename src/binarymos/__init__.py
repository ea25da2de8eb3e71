"""binarymos: 1-bit Hugging Face causal LMs with token-adaptive scales (BinaryMoS, NeurIPS 2024)."""
from .convert import BinaryMoSConfig, UnsupportedModelError, binarize
from .nn import BinaryMoSLinear, SignLinear
from .pack import load
from . import hf_quantizer  # noqa: F401  (registers the packed format with transformers)

__all__ = ["BinaryMoSConfig", "BinaryMoSLinear", "SignLinear", "UnsupportedModelError", "binarize", "load"]
__version__ = "0.1.0"
