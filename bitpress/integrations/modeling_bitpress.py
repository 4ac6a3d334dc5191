"""Loader for a bitpress checkpoint through ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` when bitpress was not imported first.

bitpress writes this file into every checkpoint and names it in ``config.json``'s
``auto_map``. It holds no model code: it imports bitpress (which registers its quantizer with
transformers) and loads the checkpoint with the architecture's own transformers class, so
the result is exactly what ``import bitpress`` + ``from_pretrained`` gives. Without bitpress
installed, transformers refuses to run it (``bitpress`` is a missing import).
"""
import bitpress  # noqa: F401  (registers the bitpress quantizer with transformers)
from bitpress.integrations.hf_quantizer import load_with_transformers
from transformers import PreTrainedModel


class BitpressAutoModelForCausalLM(PreTrainedModel):
    """Never instantiated: :meth:`from_pretrained` returns the architecture's own class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return load_with_transformers(pretrained_model_name_or_path, *model_args, **kwargs)
