"""Scale-wise AR transformers (FlexVAR, VAR), their checkpoints, and the tokenizers."""
from .checkpoint import (
    CheckpointError,
    clean_key,
    export_from_state_dict,
    export_state_dict,
    extract_state_dict,
    infer_config,
    load_checkpoint,
    read_checkpoint_file,
    read_safetensors,
    save_export,
    weights_sha256,
    write_safetensors,
)
from .tokenizers import VARVQVAE, FlexVQ16, load_tokenizer
from .transformer import ARCHS, ModelConfig, ScaleAR, preset_config


def build_model(preset: str = "flexvar-d16", **overrides) -> ScaleAR:
    """A freshly initialised model from a preset ('flexvar-d16', 'var-d24', 'flexvar-tiny', ...)."""
    return ScaleAR(preset_config(preset, **overrides))


__all__ = ["FlexVQ16", "VARVQVAE", "load_tokenizer", "ARCHS", "ModelConfig", "ScaleAR", "preset_config", "build_model",
           "load_checkpoint",
           "export_state_dict", "save_export", "extract_state_dict", "infer_config",
           "read_checkpoint_file", "CheckpointError", "clean_key", "export_from_state_dict", "read_safetensors",
           "write_safetensors", "weights_sha256"]
