"""`weights/photos_vqa2_tiny.py`: clean clips panned over photographs, for measuring vqa2-tiny on real content."""

from __future__ import annotations

import av
import numpy as np

from vqa2cli_weights.photos_vqa2_tiny import FPS, SECONDS, SIZE, make_clips


def write_png(path, image):
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded(clip):
    with av.open(str(clip)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_clips_pan_over_each_usable_photo_the_same_way_for_a_seed(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    yy, xx = np.mgrid[0:200, 0:300]
    image = np.stack([xx * 255 // 299, yy * 255 // 199, (xx + yy) % 256], axis=-1).astype(np.uint8)
    write_png(photos / "ramp.png", image)
    write_png(photos / "small.png", image[:100, :100])  # too small to pan a 128 px window over
    (photos / "broken.jpg").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("not a photo either, and not tried")

    clips = make_clips(photos, tmp_path / "a", per_photo=2, seed=0)
    assert [clip.name for clip in clips] == ["ramp_0.mp4", "ramp_1.mp4"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert f"skipped {photos / 'broken.jpg'}: not a readable image" in warnings[0]
    assert f"skipped {photos / 'small.png'}: a 100x100 photo is too small (short side under 192 px)" in warnings[1]

    frames = decoded(clips[0])
    assert frames.shape == (round(FPS * SECONDS), SIZE, SIZE, 3)
    # the camera moves 1-3 px a frame over a ramp, so the first and last frames differ throughout
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 10
    again = make_clips(photos, tmp_path / "b", per_photo=2, seed=0)
    assert all(np.array_equal(decoded(x), decoded(y)) for x, y in zip(clips, again))
