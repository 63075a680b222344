"""`vqa2 compare A B [B2 ...]`: which of several versions of a video looks better, by the model's score.

NOT a full-reference metric: no pixel of A is compared with a pixel of B (as PSNR, SSIM or VMAF do). Each
video is scored on its own, reference-free, exactly as `vqa2 score` would score it, and the scores are
subtracted: difference = score(B) - score(A). So the videos need not be aligned, the same length or even
the same content, and a candidate can score above its source (a denoised encode of a noisy source can).

A is the reference of the differences; every input gets a rank by score (1 = best, equal scores share a
rank). A candidate is "better" or "worse" than A when its score differs by more than `margin`, else "same".
With `timeline` segments, the windows are paired by position (window i of B with window i of A) and each
candidate window gets its difference; windows past the end of the shorter video have none.
"""

from __future__ import annotations

DEFAULT_MARGIN = 0.02  # a tenth of the distance between two levels' weights (0.25)


def compare_records(records: list[dict], margin: float = DEFAULT_MARGIN) -> list[dict]:
    """Rows for `vqa2 compare` from score records (dicts, `ScoreRecord.to_dict()`), the first the reference."""
    reference = records[0]
    scores = [r["score"] for r in records if r.get("score") is not None]
    rows = []
    for index, record in enumerate(records):
        score = record.get("score")
        difference = None
        if index and score is not None and reference.get("score") is not None:
            difference = score - reference["score"]
        rows.append({
            "path": record["path"],
            "reference": reference["path"],
            "score": score,
            "level": record.get("level"),
            "difference": difference,
            "verdict": "reference" if index == 0 else _verdict(difference, margin),
            "rank": None if score is None else 1 + sum(other > score for other in scores),
            "segments": _segments(record.get("segments"), reference.get("segments") if index else None),
            "model": record.get("model"),
            "error": record.get("error"),
        })
    return rows


def _verdict(difference: float | None, margin: float) -> str | None:
    if difference is None:
        return None
    if difference > margin:
        return "better"
    return "worse" if difference < -margin else "same"


def _segments(segments: list[dict] | None, reference: list[dict] | None) -> list[dict] | None:
    if segments is None:
        return None
    paired = []
    for i, window in enumerate(segments):
        base = reference[i] if reference is not None and i < len(reference) else None
        paired.append({**window, "difference": None if base is None else window["score"] - base["score"]})
    return paired


def windows_text(segments: list[dict]) -> str:
    """Table cell: how many windows fall behind the reference, and the largest drop."""
    differences = [s for s in segments if s["difference"] is not None]
    if not differences:
        return ""
    worst = min(differences, key=lambda s: s["difference"])
    behind = sum(s["difference"] < 0 for s in differences)
    text = f"{behind}/{len(differences)} behind"
    if worst["difference"] < 0:
        text += f", most at {worst['start']:.1f}-{worst['end']:.1f} s ({worst['difference']:+.3f})"
    return text


def best(rows: list[dict]) -> dict | None:
    """The best-scoring row (the first of equals), or None when nothing was scored."""
    scored = [row for row in rows if row["score"] is not None]
    return max(scored, key=lambda row: row["score"]) if scored else None
