"""tools/real_footage.py's report on a hand-made manifest: per-family ladders, overall SRCC, and the breakdown
that says whether the overall SRCC is lost to content bias or to families weighed unevenly."""

from __future__ import annotations

import csv

import pytest

from tools.real_footage import FAMILIES, breakdown, report


def write_set(folder, score):
    """Two sources, each clean and with every family at levels 1-4 (MOS 90 - 20 * level); `score(source,
    family, level)` is the model's score."""
    manifest, predictions = [], []
    for source in ("bright", "dark"):
        for family, level in [("clean", 0)] + [(f, k) for f in FAMILIES for k in range(1, 5)]:
            path = f"videos/{source}_{family}{level}.mp4"
            manifest.append({"path": path, "mos": 90 - 20 * level, "source": source, "family": family,
                             "level": level, "parameter": ""})
            predictions.append({"path": path, "score": score(source, family, level)})
    for name, rows in (("manifest.csv", manifest), ("predictions.csv", predictions)):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder / "predictions.csv"


def test_a_constant_offset_between_sources_is_content_bias_and_nothing_else(tmp_path):
    offset = {"bright": 1.0, "dark": 0.5}  # and steps of 1/8: exact in binary, so equal scores tie
    predictions = write_set(tmp_path, lambda source, family, level: offset[source] - 0.125 * level)
    result = report(tmp_path, predictions)
    assert all(result[family] == pytest.approx(1.0) for family in FAMILIES)
    assert result["overall"] < 0.9
    parts = breakdown(tmp_path, predictions)
    assert parts["levels"]["clean"] == pytest.approx([0.75])
    assert parts["levels"]["blur"] == pytest.approx([0.625, 0.5, 0.375, 0.25])
    assert parts["clean"] == pytest.approx(offset)
    assert parts["without_content_bias"] == pytest.approx(1.0)
    assert parts["without_source_offset"] == pytest.approx(1.0)


def test_a_family_weighed_too_heavily_stays_without_content_bias(tmp_path):
    # Flicker of any level drops the score by 3/8 more: every ladder is still ranked right, but flicker's
    # lightest level now scores like the other families' strongest.
    def score(source, family, level):
        return 0.875 - 0.125 * level - 0.375 * (family == "flicker")

    predictions = write_set(tmp_path, score)
    assert report(tmp_path, predictions)["flicker"] == pytest.approx(1.0)
    parts = breakdown(tmp_path, predictions)
    assert parts["levels"]["flicker"] == pytest.approx([0.375, 0.25, 0.125, 0.0])
    assert parts["without_content_bias"] == pytest.approx(report(tmp_path, predictions)["overall"])
    assert parts["without_content_bias"] < 0.9
