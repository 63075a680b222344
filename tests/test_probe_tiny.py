"""`tools/probe_vqa2_tiny.py`: the ridge probe that measures how much of the MOS a model's encodings hold."""

from __future__ import annotations

import numpy as np

from vqa2cli.metrics import srcc
from tools.probe_vqa2_tiny import best_alpha, encodings, ridge


def test_ridge_probe_finds_a_linear_signal_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    signal = x @ rng.normal(size=40) + 0.3 * rng.normal(size=300)
    noise = rng.normal(size=300)
    for y, low, high in ((signal, 0.95, 1.0), (noise, -0.2, 0.2)):
        predict = ridge(x[:200], y[:200], best_alpha(x[:200], y[:200]))
        assert low <= srcc(predict(x[200:]), y[200:]) <= high


def test_encodings_pool_each_video_into_six_llm_widths_and_skip_a_broken_one(clip_factory, monkeypatch, capsys):
    from vqa2cli.pipeline import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("vqa2-tiny", device="cpu")
    first, second = clip_factory("a.mp4", seconds=2.0, fps=12), clip_factory("b.mp4", seconds=1.0, fps=12)
    labels = first.parent / "labels.csv"
    (first.parent / "broken.mp4").write_bytes(b"not a video")
    labels.write_text(f"path,mos\n{first.name},70\nbroken.mp4,10\n{second.name},40\n")
    features, mos = encodings(model, labels)
    assert features.shape == (2, 6 * model.config.text.hidden_size) and np.isfinite(features).all()
    assert mos.tolist() == [70.0, 40.0]
    warning = capsys.readouterr().err
    assert "skipped" in warning and "broken.mp4" in warning
    assert not np.allclose(features[0], features[1])
