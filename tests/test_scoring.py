import math

import pytest
import torch

from tests.fixtures.models import tiny_video
from vqa2cli import prompts
from vqa2cli.scoring import answer_text, level_token_ids, mos_to_level, score_from_logits


def test_score_formula_by_hand():
    # probs = [1, 2, 1, 1, 1] / 6 -> score = (1 + 2 * .75 + .5 + .25 + 0) / 6
    score, level, probs = score_from_logits([0.0, math.log(2.0), 0.0, 0.0, 0.0])
    assert score == pytest.approx(3.25 / 6, abs=1e-12)
    assert level == "good"
    assert list(probs) == ["high", "good", "fair", "poor", "low"]
    assert probs["good"] == pytest.approx(2 / 6) and probs["low"] == pytest.approx(1 / 6)


def test_score_extremes_and_shift_invariance():
    assert score_from_logits(torch.zeros(5))[0] == pytest.approx(0.5)
    top = score_from_logits(torch.tensor([50.0, 0, 0, 0, 0]))
    bottom = score_from_logits(torch.tensor([0.0, 0, 0, 0, 50]))
    assert top[0] == pytest.approx(1.0) and top[1] == "high"
    assert bottom[0] == pytest.approx(0.0, abs=1e-12) and bottom[1] == "low"
    logits = torch.tensor([1.5, -0.2, 3.0, 0.7, -2.0], dtype=torch.bfloat16)
    assert score_from_logits(logits)[0] == pytest.approx(score_from_logits(logits.float() + 100)[0], abs=1e-9)
    assert score_from_logits(logits)[1] == "fair"


def test_score_rejects_bad_logits():
    with pytest.raises(ValueError, match="expected 5"):
        score_from_logits([0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        score_from_logits([0.0, float("nan"), 0, 0, 0])


def test_views_average_the_level_probabilities():
    # two views: all weight on "high", then on "fair" -> probabilities 1/2 each, score (1 + 0.5) / 2
    views = torch.tensor([[60.0, 0, 0, 0, 0], [0.0, 0, 60, 0, 0]])
    score, level, probs = score_from_logits(views)
    assert score == pytest.approx(0.75) and probs["high"] == pytest.approx(0.5) and probs["fair"] == pytest.approx(0.5)
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert score_from_logits(logits)[0] == pytest.approx(sum(score_from_logits(row)[0] for row in logits) / 3)
    with pytest.raises(ValueError, match="per view"):
        score_from_logits(torch.zeros(2, 4))


def test_level_token_ids(tiny_tokenizer):
    ids = level_token_ids(tiny_tokenizer)
    assert len(set(ids)) == 5
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["Ġhigh", "Ġgood", "Ġfair", "Ġpoor", "Ġlow"]
    with pytest.raises(ValueError, match="single|tokens"):
        level_token_ids(tiny_tokenizer, words=(" highgoodfairpoorlow",))


class _QwenLike:
    """Answers like the released Qwen2 tokenizer, except for the level-word ids given."""

    def __init__(self, ids):
        self.ids = dict(zip((" high", " good", " fair", " poor", " low"), ids))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids[text]]}

    def convert_tokens_to_ids(self, token):
        return {"<|im_start|>": 151644}[token]


def test_level_token_ids_checks_qwen2_ids():
    assert level_token_ids(_QwenLike((1550, 1661, 6624, 7852, 3347))) == [1550, 1661, 6624, 7852, 3347]
    with pytest.raises(ValueError, match="release"):
        level_token_ids(_QwenLike((1550, 1661, 6624, 3347, 7852)))


@pytest.mark.parametrize("mos,level", [
    (0, "low"), (19.99, "low"), (20, "poor"), (39.9, "poor"), (40, "fair"), (59.9, "fair"),
    (60, "good"), (79.99, "good"), (80, "high"), (100, "high"),
])
def test_mos_bands(mos, level):
    assert mos_to_level(mos) == level


def test_mos_range_rescale():
    assert [mos_to_level(m, mos_range=(1, 5)) for m in (1, 1.79, 1.8, 3, 4.2, 5)] == [
        "low", "low", "poor", "fair", "high", "high"]
    with pytest.raises(ValueError, match="outside"):
        mos_to_level(5.5, mos_range=(1, 5))
    with pytest.raises(ValueError, match="increasing"):
        mos_to_level(3, mos_range=(5, 1))


def test_answer_text():
    assert answer_text("good") == "The quality of this video is good."
    assert answer_text(" low") == "The quality of this video is low."


def test_prefill_end_reads_the_same_row_as_closed_turn(tiny_model, tiny_config, tiny_tokenizer):
    """Reading -1 of the sequence ending at "is" equals reading -3 of the release's "... is<|im_end|>\\n"
    (attention is causal)."""
    keyframes, motion = tiny_video(tiny_config)
    text = prompts.scoring_prompt("ugc")
    ids_open = torch.tensor(prompts.tokenize_prompt(text, tiny_tokenizer))
    ids_closed = torch.tensor(prompts.tokenize_prompt(text + "<|im_end|>\n", tiny_tokenizer))
    assert torch.equal(ids_closed[:-2], ids_open)
    level_ids = level_token_ids(tiny_tokenizer)
    with torch.no_grad():
        video = tiny_model.encode_video(keyframes, motion)
        open_row = tiny_model(ids_open, video).logits[0, -1]
        closed = tiny_model(ids_closed, video).logits[0]
    assert torch.allclose(open_row, closed[-3], atol=1e-5, rtol=0)
    assert not torch.allclose(closed[-1][level_ids], closed[-3][level_ids], atol=1e-3)  # one off differs
    assert score_from_logits(open_row[level_ids])[0] == pytest.approx(score_from_logits(closed[-3][level_ids])[0], abs=1e-5)
