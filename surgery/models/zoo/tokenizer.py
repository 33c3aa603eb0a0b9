"""The zoo's tokenizer: a whitespace WordLevel vocabulary built in memory, identical on every machine.

Every token of the synthetic tasks is one whitespace-separated word, so ``text.split()`` and the
tokenizer agree token for token. ``encode`` adds ``<bos>`` in front and ``<eos>`` at the end.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, MASK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, IMAGE)
NUMBERS = tuple(str(i) for i in range(23))  # enough for arithmetic modulo 23
TASK_TOKENS = ("copy:", "reverse:", "sort:", "inc:", "add:", "colour:", "shape:", "=")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + NUMBERS + TASK_TOKENS + COLOURS + SHAPES


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer over ``VOCAB`` (ids are the positions in ``VOCAB``; ``<pad>`` is 0)."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, mask_token=MASK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=128,
    )


def token_ids(words: list[str]) -> list[int]:
    """Ids of whitespace tokens without the tokenizer (same result as the tokenizer, faster)."""
    return [_IDS.get(word, _IDS[UNK]) for word in words]


_IDS = {token: i for i, token in enumerate(VOCAB)}
