"""The toy model's word-level tokenizer, built with ``tokenizers`` and used through transformers.

Ids: 0 ``<pad>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<unk>``, then the generator's words (lower-cased; text is
split into runs of letters/digits and runs of punctuation), and last ``<image>``, the image placeholder (as
llava-hf's 32000 sits after the text vocabulary). ``add_special_tokens=True`` prepends ``<s>``; decoding joins
words with spaces. It is saved with ``save_pretrained`` beside the weights, so ``AutoTokenizer.from_pretrained``
(the path every converted checkpoint takes) loads it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from jaxdebias.toy import scenes

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"


def build() -> PreTrainedTokenizerFast:
    """The tokenizer over ``scenes.vocabulary()`` (deterministic: the same ids on every machine)."""
    words = scenes.vocabulary()
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *words, IMAGE])}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, vocab[BOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, extra_special_tokens={"image_token": IMAGE},
                                  clean_up_tokenization_spaces=False, model_max_length=2048)
    return tok


def load(path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a checkpoint directory."""
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def image_token_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE)
