import pytest

from vqa2cli import prompts
from vqa2cli.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def test_ugc_prompt_text():
    user = (
        "The key frames of this video are:\n<image>. And the motion feature of the video is\n<image>. "
        "How would you rate the quality of this video?"
    )
    closed = SYSTEM + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\nThe quality of the video is<|im_end|>\n"
    assert prompts.scoring_prompt("ugc") == closed[: -len("<|im_end|>\n")]  # the release's, two tokens short


def test_streaming_and_enhanced_prompt_text():
    stream = prompts.scoring_prompt("streaming", context="Stalling: 2 events, 3.5 s in total. ")
    assert stream == (
        SYSTEM + "<|im_start|>user\nStalling: 2 events, 3.5 s in total. How would you rate the quality of this "
        "video?\n<image><|im_end|>\n<|im_start|>assistant\nThe quality of the video is"
    )
    enhanced = SYSTEM + "<|im_start|>user\n<image><image><|im_end|>\n<|im_start|>assistant\n"
    assert prompts.scoring_prompt("enhanced") == enhanced
    with pytest.raises(ValueError, match="unknown prompt kind"):
        prompts.scoring_prompt("hdr")


def test_question_prompt():
    text = prompts.question_prompt(" Is the video blurry? ", num_keyframes=8, num_frames=240)
    assert text.startswith(SYSTEM + "<|im_start|>user\n")
    assert "8 distinct frames sampled one per second" in text and "all 240 frames" in text
    assert "\nThe video frames:<image>\nThe video motion features:<image>\n.Is the video blurry?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    mc = prompts.question_prompt("Which distortion dominates?", 8, 240, choices=["blur", "noise", "stalling"])
    assert "Which distortion dominates?\nA. blur\nB. noise\nC. stalling\n" + prompts.CHOICE_INSTRUCTION in mc
    with pytest.raises(ValueError):
        prompts.question_prompt("q", 1, 4, choices=[str(i) for i in range(9)])


class CharTokenizer:
    """One token per character (its code point): expected ids can be written out by hand."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def chars(text):
    return [ord(c) for c in text]


def test_tokenize_prompt_places_image_slots():
    assert prompts.tokenize_prompt("ab<image>c<image><image>", CharTokenizer()) == chars("ab") + [
        IMAGE_TOKEN_INDEX] + chars("c") + [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]
    assert prompts.tokenize_prompt("<image>", CharTokenizer()) == [IMAGE_TOKEN_INDEX]


def test_tokenize_prompt_with_the_tiny_tokenizer(tiny_tokenizer):
    ids = prompts.tokenize_prompt(prompts.scoring_prompt("ugc"), tiny_tokenizer)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    # ChatML markers are single special tokens; the <image> vocabulary token itself never appears.
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tiny_tokenizer.convert_tokens_to_ids("<image>") not in ids
    assert tiny_tokenizer.decode([i for i in ids if i >= 0]) == prompts.scoring_prompt("ugc").replace("<image>", "")


def test_training_example_masks_all_but_answers():
    conv = [{"from": "human", "value": "Hi<image>"}, {"from": "gpt", "value": "No."},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Blur."}]
    ids, labels = prompts.training_example(conv, CharTokenizer(), system="S")
    prompt = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi"
    middle = "<|im_end|>\n<|im_start|>assistant\n"
    second = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert ids == (chars(prompt) + [IMAGE_TOKEN_INDEX] + chars(middle + "No.<|im_end|>\n" + second
                                                                  + "Blur.<|im_end|>\n"))
    ignored = [IGNORE_INDEX]
    # supervised: each answer and the <|im_end|> closing it; not the newline after it, nor any prompt part
    assert labels == (ignored * (len(prompt) + 1 + len(middle)) + chars("No.<|im_end|>") + ignored
                      + ignored * len(second) + chars("Blur.<|im_end|>") + ignored)
    with pytest.raises(ValueError, match="speaker"):
        prompts.training_example([{"from": "system", "value": "x"}], CharTokenizer())
    with pytest.raises(ValueError, match="answer cannot contain"):
        prompts.training_example([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}], CharTokenizer())


def test_training_prompt_part_is_the_inference_prompt(tiny_tokenizer):
    """Tokenised turn by turn, a training example starts with exactly the ids `vqa2 ask`/`score` feed."""
    conv = [{"from": "human", "value": prompts.UGC_USER}, {"from": "gpt", "value": "The quality of this video is good."}]
    ids, labels = prompts.training_example(conv, tiny_tokenizer)
    prompt = prompts.tokenize_prompt(prompts.chatml([("user", prompts.UGC_USER), ("assistant", None)]), tiny_tokenizer)
    assert ids[: len(prompt)] == prompt
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX} and labels[len(prompt)] != IGNORE_INDEX


def test_tiny_tokenizer(tiny_tokenizer):
    from vqa2cli.tokenizer import build_tokenizer

    for word in (" high", " good", " fair", " poor", " low"):
        assert len(tiny_tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    assert tiny_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]) == [0, 1, 2, 3]
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    assert len(tiny_tokenizer) <= 512
    # Deterministic: a second build is identical.
    assert build_tokenizer().backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    # Byte-level: any text round-trips.
    text = "Qualité: 4K HDR 😀\n\tok"
    assert tiny_tokenizer.decode(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) == text
