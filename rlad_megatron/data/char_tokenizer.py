"""A character-level Hugging Face tokenizer over a fixed vocabulary (< 128 entries), built offline.

Ids: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then digits (`0`=4 ... `9`=13), lowercase,
uppercase, space, newline and ASCII punctuation. That covers the addition task (`0-9 + = ; : Q A`)
and small `<answer>...</answer>` text tasks. Each character is one token; decoding concatenates
tokens, so `decode(encode(s)) == s` for any string over the vocabulary. Nothing is added around
the text (no automatic BOS/EOS); the pad and EOS ids are set for generation and batching.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n" + string.punctuation
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARS])}


def build_char_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The char-level `PreTrainedTokenizerFast`; round-trips through `save_pretrained`/`AutoTokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, incl. \n
    backend.decoder = decoders.Fuse()  # join tokens with nothing in between
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
