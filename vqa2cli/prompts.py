"""Prompts in LLaVA's ChatML template `qwen_1_5`, and their tokenisation with `<image>` slots.

Rendering follows LLaVA-NeXT's `conv_qwen` (sep style CHATML): the system turn, then for each turn
`<|im_start|>role\\nmessage<|im_end|>\\n`, or just `<|im_start|>role\\n` when the message is empty/None.

Tokenisation follows LLaVA's `tokenizer_image_token`: split the text on `<image>`, tokenise each chunk
without special-token insertion, and put `IMAGE_TOKEN_INDEX` (a negative id, never a vocabulary id)
where each `<image>` was. The model replaces those positions by the keyframe and motion blocks.
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id
IGNORE_INDEX = -100  # label of positions that carry no loss

SCORE_PREFILL = "The quality of the video is"
SCORE_QUESTION = "How would you rate the quality of this video?"
# First-release scorer prompts (UGC scorer, streaming scorer). The streaming prompt has ONE placeholder:
# in the release it therefore receives only the keyframe block (see VQA2Model.places_motion).
UGC_USER = (
    f"The key frames of this video are:\n{IMAGE_TOKEN}. And the motion feature of the video is\n"
    f"{IMAGE_TOKEN}. {SCORE_QUESTION}"
)
STREAMING_USER = f"{SCORE_QUESTION}\n{IMAGE_TOKEN}"
ENHANCED_USER = IMAGE_TOKEN * 2  # newer script for the `enhanced` checkpoint: no words, empty assistant turn


def chatml(turns: list[tuple[str, str | None]], system: str = SYSTEM_PROMPT) -> str:
    """Render (role, message) turns; a None/empty message opens that role's turn without closing it."""
    text = f"{IM_START}system\n{system}{IM_END}\n"
    for role, message in turns:
        text += f"{IM_START}{role}\n{message}{IM_END}\n" if message else f"{IM_START}{role}\n"
    return text


def scoring_prompt(kind: str = "ugc", context: str = "") -> str:
    """The scorer prompt of a checkpoint kind: "ugc", "streaming" or "enhanced".

    `context` is prepended to the user turn (streaming data puts stalling information there).
    The level distribution is read at the last position. The release renders the assistant prefill as a
    closed turn ("... is<|im_end|>\\n") and reads position -3; attention being causal, ending the sequence
    at "is" gives the same logits at -1 with two tokens less. For "enhanced" the assistant turn is empty.
    """
    if kind == "enhanced":
        return chatml([("user", context + ENHANCED_USER), ("assistant", None)])
    users = {"ugc": UGC_USER, "streaming": STREAMING_USER}
    if kind not in users:
        raise ValueError(f"unknown prompt kind {kind!r}; expected ugc, streaming or enhanced")
    return chatml([("user", context + users[kind]), ("assistant", SCORE_PREFILL)])[: -len(f"{IM_END}\n")]


# The release's image scripts (enhanced checkpoint; model_score_image.py, model_vqa_image.py): ONE placeholder,
# which takes the keyframe block only (the image's repeated-frame motion features are computed, never placed).
IMAGE_SCORE_PREFILL = "The overall quality of the image is"
IMAGE_PREAMBLE = "You will receive one image. Please analyze these images and answer the questions based on your observations."


def image_scoring_prompt() -> str:
    """The scorer prompt for a still image: user turn `<image>`, assistant prefilled "The overall quality of
    the image is"; the level distribution is read at its last token, as for `scoring_prompt`."""
    return chatml([("user", IMAGE_TOKEN), ("assistant", IMAGE_SCORE_PREFILL)])[: -len(f"{IM_END}\n")]


def image_question_prompt(question: str) -> str:
    """The Assistant prompt for a question about a still image, ready for generation."""
    return chatml([("user", f"{IMAGE_PREAMBLE}\n{IMAGE_TOKEN}\n{question.strip()}"), ("assistant", None)])


# Our wording of the Assistant's preamble: the reference gives its content (N keyframes sampled one per
# second, motion features from all frames) and the exact frame/motion lines; the sentences are ours.
ASSISTANT_PREAMBLE = (
    "You will receive {num_keyframes} distinct frames sampled one per second from a video, in temporal "
    "order. You will also receive motion features extracted from all {num_frames} frames of the video, in "
    "temporal order. Please analyze them and answer the question based on your observations."
)
MEDIA_LINES = f"The video frames:{IMAGE_TOKEN}\nThe video motion features:{IMAGE_TOKEN}\n."
# Our wording of the multiple-choice instruction (the reference only says "answer with the option letter").
CHOICE_INSTRUCTION = "Answer with the uppercase letter of the correct option followed by a period, and nothing else."
OPTION_LETTERS = "ABCDEFGH"


def question_prompt(
    question: str,
    num_keyframes: int,
    num_frames: int,
    choices: list[str] | None = None,
) -> str:
    """The Assistant prompt for a free-form (or multiple-choice, given `choices`) question, ready for
    generation: ends with the opened assistant turn."""
    user = ASSISTANT_PREAMBLE.format(num_keyframes=num_keyframes, num_frames=num_frames) + "\n"
    user += MEDIA_LINES + question.strip()
    if choices:
        if len(choices) > len(OPTION_LETTERS):
            raise ValueError(f"at most {len(OPTION_LETTERS)} choices are supported")
        user += "\n" + "".join(f"{letter}. {c}\n" for letter, c in zip(OPTION_LETTERS, choices))
        user += CHOICE_INSTRUCTION
    return chatml([("user", user), ("assistant", None)])


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of `text` with IMAGE_TOKEN_INDEX in place of each `<image>` (LLaVA's scheme)."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def training_example(
    conversations: list[dict],
    tokenizer,
    system: str = SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA-style conversation `[{"from": "human"|"gpt", "value": ...}, ...]`.

    Labels are IGNORE_INDEX everywhere except each answer's tokens and the `<|im_end|>` closing it (so the
    model learns to stop). The release also supervises the ChatML markers of every turn; we do not.
    Every turn is tokenised on its own so the ids of the prompt part equal those of the inference prompt.
    """
    roles = {"human": "user", "gpt": "assistant"}
    ids = tokenize_prompt(chatml([], system), tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for turn in conversations:
        role = roles.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversation turn with unknown speaker {turn.get('from')!r}")
        head = tokenize_prompt(f"{IM_START}{role}\n", tokenizer)
        body = tokenize_prompt(turn["value"], tokenizer)
        end = tokenize_prompt(IM_END, tokenizer)
        newline = tokenize_prompt("\n", tokenizer)
        ids += head + body + end + newline
        if role == "assistant":
            if IMAGE_TOKEN_INDEX in body:
                raise ValueError("an answer cannot contain <image>")
            labels += [IGNORE_INDEX] * len(head) + body + end + [IGNORE_INDEX] * len(newline)
        else:
            labels += [IGNORE_INDEX] * (len(head) + len(body) + len(end) + len(newline))
    return ids, labels
