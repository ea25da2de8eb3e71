"""Registers the packed format with transformers, so that after ``import binarymos``

    AutoModelForCausalLM.from_pretrained(PACKED_DIR)

builds the packed layers, validates the directory (manifest checksums, then every tensor's name,
shape and dtype against the config) and loads the weights, with no remote code. Only safetensors
are read. ``save_pretrained`` of such a model writes the packed form again, manifest included.
"""
from __future__ import annotations

import types
from pathlib import Path

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer

from . import pack
from .pack import QUANT_METHOD, BinaryMoSQuantConfig


class BinaryMoSHfQuantizer(HfQuantizer):
    """Loads directories written by `binarymos pack`; it does not quantize on the fly."""

    requires_calibration = True  # from_pretrained(..., quantization_config=...) of a float model is refused

    def _process_model_before_weight_loading(self, model, **kwargs):
        pack.build_skeleton(model, self.quantization_config)
        _skip_init_of_packed_parents(model)
        directory = _checkpoint_dir(model, kwargs.get("checkpoint_files"))
        headers = pack.verify_files(directory)
        pack.check_tensors(directory, headers, model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # an instance attribute: transformers' own save_pretrained would not write the manifest
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _skip_init_of_packed_parents(model) -> None:
    """Mark the modules that hold packed layers as initialized (every tensor of theirs is checked to be in
    the files), so that no architecture's ``_init_weights`` reaches for the ``.weight`` a packed layer
    has not got (GPT-2 re-initializes ``attn.c_proj.weight``)."""
    for name, module in model.named_modules():
        if isinstance(module, pack.PACKED_LAYERS):
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True


def _checkpoint_dir(model, checkpoint_files) -> Path:
    if checkpoint_files:
        unsafe = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
        if unsafe:  # refuse before anything is read: only safetensors, never pickle
            raise pack.PackFormatError(f"{unsafe[0]}: packed models load from .safetensors files only")
        return Path(checkpoint_files[0]).parent
    directory = Path(model.config.name_or_path)
    if not directory.is_dir():
        raise pack.PackFormatError(f"{model.config.name_or_path}: packed models load from a local directory "
                                   "(download the repository first)")
    return directory


def _save_pretrained(model, save_directory, max_shard_size=pack.DEFAULT_SHARD_SIZE, push_to_hub=False, **kwargs):
    """save_pretrained of a packed model: the packed files and their manifest (pack.save)."""
    if push_to_hub:
        raise ValueError("binarymos: push_to_hub is not supported for packed models; save, then upload the folder")
    return pack.save(model, save_directory, max_shard_size=max_shard_size)


def _register() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BinaryMoSQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BinaryMoSHfQuantizer)


_register()
