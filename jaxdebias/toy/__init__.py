"""A toy world for the embedded default model: generated scenes and questions (``scenes``), a word-level
tokenizer (``tokenizer``), a small LLaVA-1.5-shaped model trained on them (``train``, shipped in
``jaxdebias/assets/toy_model``) and the paper's experiment at toy scale (``experiment``).

    from jaxdebias.toy import load_default
    model, tok = load_default()        # a trained jaxdebias.models.llava.Llava and its PreTrainedTokenizerFast
"""

from jaxdebias.toy.model import default_path, load, load_default

__all__ = ["default_path", "load", "load_default"]
