"""Small byte-level BPE tokenizers in Qwen2's style, for tests and the shipped tiny model.

Same pieces as Qwen2's tokenizer, scaled down: Qwen2's pre-tokenisation regex, byte-level BPE, the
ChatML specials, `<image>`, and the five level words (" high", ...) as single tokens (the score reads
one logit per level word). Training is deterministic: a fixed corpus built from our own prompts and
answers, so the same call always yields the same vocabulary and merges.
"""

from __future__ import annotations

from .config import LEVEL_WORDS
from .prompts import (
    ASSISTANT_PREAMBLE,
    CHOICE_INSTRUCTION,
    ENHANCED_USER,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    SCORE_PREFILL,
    STREAMING_USER,
    SYSTEM_PROMPT,
    UGC_USER,
)

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN)
# Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen2 models).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _corpus() -> list[str]:
    levels = [w.strip() for w in LEVEL_WORDS]
    texts = [SYSTEM_PROMPT, UGC_USER, STREAMING_USER, ENHANCED_USER, CHOICE_INSTRUCTION,
             ASSISTANT_PREAMBLE.format(num_keyframes=8, num_frames=240)]
    texts += [f"{SCORE_PREFILL} {level}." for level in levels]
    texts += [f"The quality of this video is {level}." for level in levels]
    texts += [
        "What is the main spatial distortion of this video? It is blur.",
        "What is the main motion distortion of this video? It is stalling.",
        "Is the video sharp? Yes, the details are clear. No, there is noise and compression artifacts.",
        "The video is overexposed, underexposed, shaky, out of focus, with low contrast and banding.",
    ]
    # Repetition makes the level words (and their leading space) the most frequent pairs, so they merge
    # into whole tokens early; `build_tokenizer` checks that they did.
    return texts * 4 + [" ".join(levels)] * 64


def build_tokenizer(vocab_size: int = 512):
    """A `PreTrainedTokenizerFast` with at most `vocab_size` ids (specials 0..3: endoftext, im_start,
    im_end, <image>). eos = `<|im_end|>` (end of an assistant turn), pad = `<|endoftext|>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        padding_side="left",
    )
    for word in LEVEL_WORDS:
        ids = fast(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"level word {word!r} is not a single token ({ids}); raise vocab_size")
    return fast
