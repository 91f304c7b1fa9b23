"""Model layer: load any Hugging Face decoder (or the embedded default) behind a TransformerBridge."""

from mechscope.models.check import require_model
from mechscope.models.hooks import check_hook_name
from mechscope.models.load import (
    ALIASES,
    Model,
    ModelSummary,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    plain_attention,
)

__all__ = ["ALIASES", "Model", "ModelSummary", "embedded_gguf_path", "load_model", "load_tokenizer", "check_hook_name",
           "plain_attention", "require_model"]
