"""From level-word logits to a score, and from MOS to the level words of training answers.

score = sum_i w_i * softmax(logits of the five level words)_i, w = [1, .75, .5, .25, 0] -> [0, 1].
The level is the most probable word. (Later release scripts use w = [1, .8, .6, .4, .2]: an affine map
of ours, same ranking.)
"""

from __future__ import annotations

import math

from .config import LEVEL_WORDS

LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
# The release's scoring scripts hard-code these ids of the level words in Qwen2's tokenizer.
QWEN2_LEVEL_IDS = (1550, 1661, 6624, 7852, 3347)
QWEN2_IM_START_ID = 151644


def level_token_ids(tokenizer, words=LEVEL_WORDS) -> list[int]:
    """Vocabulary ids of the level words; each must be exactly one token. For a Qwen2 tokenizer
    (recognised by `<|im_start|>` = 151644) the default words must map to the release's ids."""
    ids = []
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(word_ids) != 1:
            raise ValueError(f"level word {word!r} is {len(word_ids)} tokens in this tokenizer, expected 1")
        ids.append(word_ids[0])
    qwen2 = tokenizer.convert_tokens_to_ids("<|im_start|>") == QWEN2_IM_START_ID
    if qwen2 and tuple(words) == LEVEL_WORDS and tuple(ids) != QWEN2_LEVEL_IDS:
        raise ValueError(f"Qwen2 tokenizer maps the level words to {ids}, not the release's {list(QWEN2_LEVEL_IDS)}")
    return ids


def score_from_logits(level_logits, words=LEVEL_WORDS, weights=LEVEL_WEIGHTS) -> tuple[float, str, dict[str, float]]:
    """level_logits: the five logits (tensor or sequence), in `words` order; or [V, 5], one row per view of
    the video, whose level probabilities are averaged (so the score is the mean of the views' scores).

    Returns (score in [0, 1], level word without its space, {level: probability}). Computed in float64
    so the result does not depend on the model's dtype beyond the logits themselves.
    """
    import torch

    logits = torch.as_tensor(level_logits, dtype=torch.float64)
    if logits.dim() > 2 or logits.shape[-1:] != (len(words),) or logits.numel() == 0:
        raise ValueError(f"expected {len(words)} level logits (per view), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"level logits are not finite: {logits.tolist()}")
    probs = torch.softmax(logits.reshape(-1, len(words)), dim=1).mean(dim=0)
    score = float((probs * torch.tensor(weights, dtype=torch.float64)).sum())
    names = [w.strip() for w in words]
    level = names[int(torch.argmax(probs))]
    return score, level, {name: float(p) for name, p in zip(names, probs)}


def mos_to_level(mos: float, mos_range: tuple[float, float] = (0.0, 100.0), words=LEVEL_WORDS) -> str:
    """Training level of a mean opinion score: rescaled to 0-100, then bands of 20 from the bottom:
    [0, 20) low, [20, 40) poor, [40, 60) fair, [60, 80) good, [80, 100] high."""
    lo, hi = mos_range
    if not hi > lo:
        raise ValueError(f"mos_range must be increasing, got {mos_range}")
    if not (math.isfinite(mos) and lo <= mos <= hi):
        raise ValueError(f"MOS {mos} is outside mos_range {mos_range}")
    scaled = (mos - lo) / (hi - lo) * 100.0
    band = min(int(scaled // 20), len(words) - 1)  # 100 belongs to the top band
    return words[len(words) - 1 - band].strip()


def answer_text(level: str) -> str:
    """Stage-2 training answer for a level word."""
    return f"The quality of this video is {level.strip()}."
