"""binarymos: 1-bit Hugging Face causal LMs with token-adaptive scales (BinaryMoS, NeurIPS 2024)."""
from .convert import BinaryMoSConfig, UnsupportedModelError, binarize
from .nn import BinaryMoSLinear, SignLinear

__all__ = ["BinaryMoSConfig", "BinaryMoSLinear", "SignLinear", "UnsupportedModelError", "binarize"]
__version__ = "0.1.0"
