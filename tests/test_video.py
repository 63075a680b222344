"""load_video on clips made with PyAV: sampling rules, preprocessing values, damage and bad files."""

from __future__ import annotations

import dataclasses
import pickle
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import vqa2cli
from tests.fixtures.clips import BAD_FILES, decoded_frames, deny_reads, frame_pattern, garble, make_clip, truncate
from vqa2cli.errors import InputError
from vqa2cli.video import (Sampling, VideoError, VideoSample, _MotionBuffer, _rewound, check_video, damage_warnings,
                           load_video, normalize, stream_duration)

ONE_STEP = 1 / 127.5  # one uint8 level after normalisation


def rule(num_frames: int, fps) -> list[int]:
    """The release's keyframe rule, written out: one per whole second, one for the leftover frames."""
    step = round(float(fps))
    whole = num_frames // step
    return [i * step for i in range(whole)] + ([whole * step] if num_frames % step else [])


def index_pattern(i, w, h):
    """Every pixel carries the frame index, so a decoded frame tells which source frame it is."""
    return np.full((h, w, 3), (i % 256, (i // 256) * 16, 128), np.uint8)


def frame_numbers(motion: torch.Tensor) -> list[int]:
    rgb = motion.to(torch.int64).float().mean(dim=(2, 3)).round().long()
    return [int(r) + int(g) // 16 * 256 for r, g, _ in rgb.tolist()]


def check_sample(sample: VideoSample, num_frames: int, fps, size=(32, 24)):
    assert sample.num_frames == num_frames
    assert sample.keyframe_indices == rule(num_frames, fps)
    assert sample.fps == pytest.approx(float(fps), rel=1e-3)
    t = max(num_frames - num_frames % 4, 4)
    assert sample.motion_indices == (list(range(t)) if num_frames >= 4 else
                                     list(range(num_frames)) + [num_frames - 1] * (4 - num_frames))
    assert sample.keyframes.shape == (len(sample.keyframe_indices), 3, size[0], size[0])
    assert sample.keyframes.dtype == torch.float32
    assert sample.motion.shape == (t, 3, size[1], size[1])
    assert sample.motion.dtype == torch.uint8
    assert sample.keyframes.min() >= -1 and sample.keyframes.max() <= 1
    assert sample.warnings == []


@pytest.mark.parametrize("name,codec,size", [
    ("h264.mp4", "libx264", (64, 48)),
    ("hevc.mp4", "libx265", (64, 48)),
    ("vp9.webm", "libvpx-vp9", (64, 48)),
    ("av1.mp4", "libsvtav1", (64, 64)),
    ("mpeg4.avi", "mpeg4", (64, 48)),
    ("ffv1.mkv", "ffv1", (64, 48)),
])
def test_codecs(tmp_path, name, codec, size):
    path = make_clip(tmp_path / name, seconds=2.2, fps=25, size=size, codec=codec)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    check_sample(sample, 55, 25)
    assert sample.keyframe_indices == [0, 25, 50]
    assert (sample.width, sample.height) == size
    assert sample.duration == pytest.approx(2.2, abs=1e-3)


@pytest.mark.parametrize("fps,seconds,container", [
    (24, 3.3, "mp4"), (25, 2.0, "mp4"), ("30000/1001", 2.5, "mp4"), ("30000/1001", 2.5, "mkv"),
    (60, 1.5, "webm"), (60, 2.0, "mov"),
])
def test_frame_rates(tmp_path, fps, seconds, container):
    rate = Fraction(fps)
    path = make_clip(tmp_path / f"clip.{container}", seconds=seconds, fps=rate, size=(32, 24))
    n = round(seconds * rate)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    check_sample(sample, n, rate)
    assert sample.duration == pytest.approx(n / rate, abs=2e-3)


def test_whole_seconds_get_no_extra_keyframe(tmp_path):
    exact = load_video(make_clip(tmp_path / "a.mp4", frames=50, fps=25, size=(32, 24)), 32, 24)
    over = load_video(make_clip(tmp_path / "b.mp4", frames=51, fps=25, size=(32, 24)), 32, 24)
    assert exact.keyframe_indices == [0, 25]
    assert over.keyframe_indices == [0, 25, 50]


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 12])
def test_short_clips(tmp_path, frames):
    path = make_clip(tmp_path / "short.mkv", frames=frames, fps=25, codec="ffv1", pattern=index_pattern)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    check_sample(sample, frames, 25)
    assert frame_numbers(sample.motion) == sample.motion_indices
    assert sample.duration == pytest.approx(frames / 25, abs=1e-3)


def test_half_second_clip(tmp_path):
    sample = load_video(make_clip(tmp_path / "half.mp4", seconds=0.5, fps=30, size=(32, 24)), 32, 24)
    check_sample(sample, 15, 30)
    assert sample.keyframe_indices == [0]
    assert len(sample.motion_indices) == 12


@pytest.mark.parametrize("frames,cap", [(120, 50), (120, 48), (1000, 64), (97, 96)])
def test_motion_cap_subsamples_uniformly(tmp_path, frames, cap):
    path = make_clip(tmp_path / "long.mkv", frames=frames, fps=25, size=(16, 16), codec="ffv1",
                     pattern=index_pattern)
    sample = load_video(path, keyframe_size=16, motion_size=16, max_motion_frames=cap)
    t = cap - cap % 4
    assert sample.motion_indices == [k * frames // t for k in range(t)]
    assert sample.motion.shape[0] == t
    assert frame_numbers(sample.motion) == sample.motion_indices
    assert sample.keyframe_indices == rule(frames, 25)  # the cap never touches keyframes


@pytest.mark.parametrize("seconds,cap", [(10, 4), (10, 10), (9.5, 3), (3, 40)])
def test_keyframe_cap_spreads_seconds_uniformly(tmp_path, seconds, cap):
    frames = round(seconds * 10)
    path = make_clip(tmp_path / "long.mkv", frames=frames, fps=10, size=(16, 16), codec="ffv1",
                     pattern=index_pattern)
    sample = load_video(path, keyframe_size=16, motion_size=16, max_keyframes=cap)
    candidates = rule(frames, 10)
    if len(candidates) <= cap:
        assert sample.keyframe_indices == candidates
    else:
        assert sample.keyframe_indices == [candidates[k * len(candidates) // cap] for k in range(cap)]
    assert sample.keyframes.shape[0] == len(sample.keyframe_indices) == min(cap, len(candidates))
    assert frame_numbers(sample.motion) == sample.motion_indices  # motion is untouched by the cap


def test_motion_buffer_survives_an_undercount():
    # The packet count said 10 frames; the decoder delivers 200. Storage must stay within the cap.
    buffer = _MotionBuffer(expected=10, limit=8, size=2)
    for i in range(200):
        slot = buffer.slot(i) if buffer.wants(i) else None
        if slot is not None:
            slot[...] = i % 256
        assert len(buffer.indices) <= 8 and buffer.frames.shape[0] <= 8
    frames, indices = buffer.result()
    assert len(indices) in (4, 8) and len(indices) % 4 == 0
    assert indices == sorted(set(indices)) and indices[0] == 0 and indices[-1] >= 100
    steps = np.diff(indices)
    assert steps.max() == steps.min()  # still evenly spaced
    assert [int(f[0, 0, 0]) for f in frames] == indices


def test_motion_buffer_grows_when_all_frames_fit():
    buffer = _MotionBuffer(expected=3, limit=100, size=2)
    for i in range(30):
        assert buffer.wants(i)
        buffer.slot(i)[...] = i
    frames, indices = buffer.result()
    assert indices == list(range(28))
    assert [int(f[0, 0, 0]) for f in frames] == indices


def test_output_too_big_for_memory_is_a_video_error(clip, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(VideoError, match="too long to hold in memory"):
        load_video(clip)


def test_undercount_while_resizing_in_the_background(tmp_path, monkeypatch):
    # The probe claims 6 frames; 120 arrive. Both buffers grow, motion halves, with resize jobs pending.
    import vqa2cli.video as video

    probe = video._probe
    monkeypatch.setattr(video, "_probe", lambda *args: dataclasses.replace(probe(*args), packets=6))
    path = make_clip(tmp_path / "long.mkv", frames=120, fps=10, size=(16, 16), codec="ffv1",
                     pattern=index_pattern)
    sample = load_video(path, keyframe_size=16, motion_size=16, max_motion_frames=16)
    assert sample.motion_indices == list(range(0, 96, 8))  # halved to every 8th, 15 kept, cut to 12
    assert frame_numbers(sample.motion) == sample.motion_indices
    assert sample.keyframe_indices == list(range(0, 120, 10))
    assert frame_numbers(((sample.keyframes + 1) * 127.5).round().to(torch.uint8)) == sample.keyframe_indices


@pytest.mark.parametrize("suffix", ["mp4", "webm", "mkv", "cut.mp4"])
def test_one_open_gives_what_a_second_open_gives(tmp_path, monkeypatch, suffix):
    # The probe's container is rewound for decoding (indexed formats); opening anew is the fallback.
    import vqa2cli.video as video

    ext = suffix.split(".")[-1]
    path = make_clip(tmp_path / f"clip.{ext}", seconds=4, size=(64, 48), options={"g": "25"},
                     container_options={"movflags": "faststart"} if ext == "mp4" else None)
    if suffix.startswith("cut"):
        path = truncate(path, tmp_path / "cut.mp4", 0.6)
    rewound = []

    def spy(p, container, probe):
        result = _rewound(p, container, probe)
        rewound.append(result is container)
        return result

    monkeypatch.setattr(video, "_rewound", spy)
    once = load_video(path, 32, 24)
    monkeypatch.setattr(video, "_REWINDABLE", ())
    twice = load_video(path, 32, 24)
    assert rewound == [True, False]
    assert torch.equal(once.motion, twice.motion) and torch.equal(once.keyframes, twice.keyframes)
    assert (once.motion_indices, once.keyframe_indices, once.warnings, once.duration) == \
        (twice.motion_indices, twice.keyframe_indices, twice.warnings, twice.duration)


def test_conversion_error_is_a_video_error(clip, monkeypatch):
    import av

    import vqa2cli.video as video

    def fail(*args):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    threads = threading.active_count()
    monkeypatch.setattr(video, "_fast_resize_into", fail)
    with pytest.raises(VideoError, match="cannot convert yuv420p pixels to RGB") as caught:
        load_video(clip, keyframe_size=32, motion_size=24)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert threading.active_count() == threads  # the resize thread is gone


def test_max_motion_frames_must_allow_four():
    with pytest.raises(ValueError):
        load_video("unused.mp4", max_motion_frames=3)


@pytest.mark.parametrize("container", ["mkv", "mp4"])
def test_variable_frame_rate(tmp_path, container):
    times = [0.0, 0.04, 0.08, 0.2, 0.3, 0.31, 0.32, 0.33, 0.5, 0.9, 1.0, 1.1, 1.2, 1.25, 1.3, 1.35,
             1.4, 1.45, 1.5, 1.55, 1.6, 1.65, 1.7, 1.75, 1.8, 1.85, 1.9, 1.95, 2.0, 2.05]
    path = make_clip(tmp_path / f"vfr.{container}", timestamps=times, fps=25, size=(32, 24))
    sample = load_video(path, keyframe_size=32, motion_size=24)
    assert sample.num_frames == len(times)
    # fps is the average rate, frames / duration; the last frame lasts 1/25 s (the stream's rate).
    assert sample.duration == pytest.approx(2.05 + 0.04, abs=0.011)
    assert sample.fps == pytest.approx(len(times) / sample.duration, rel=1e-6)
    assert sample.keyframe_indices == rule(len(times), sample.fps)
    assert sample.motion_indices == list(range(28))


def test_containers_without_frame_counts(tmp_path):
    import av

    path = make_clip(tmp_path / "clip.webm", seconds=3, fps=30, size=(32, 24))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    check_sample(load_video(path, keyframe_size=32, motion_size=24), 90, 30)


def marked(i, w, h):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 4, : w // 4] = 255  # a white block in the top-left corner
    return rgb


@pytest.mark.parametrize("rotation,corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotation_comes_out_upright(tmp_path, rotation, corner):
    plain = load_video(make_clip(tmp_path / "plain.mp4", frames=4, size=(64, 32), pattern=marked), 32, 24)
    turned = load_video(make_clip(tmp_path / "turned.mp4", frames=4, size=(64, 32), pattern=marked,
                                  rotation=rotation), 32, 24)
    expected_size = (32, 64) if rotation % 180 else (64, 32)
    assert (turned.width, turned.height) == expected_size
    k = rotation // 90 % 4  # display matrix angles are counter-clockwise, like np.rot90
    assert torch.equal(turned.motion, torch.rot90(plain.motion, k, dims=(2, 3)))
    assert torch.allclose(turned.keyframes, torch.rot90(plain.keyframes, k, dims=(2, 3)), atol=1.01 * ONE_STEP)
    luma = turned.keyframes[0].mean(0)
    h = luma.shape[0] // 2
    quadrants = {"top-left": luma[:h, :h], "top-right": luma[:h, h:],
                 "bottom-left": luma[h:, :h], "bottom-right": luma[h:, h:]}
    assert max(quadrants, key=lambda q: quadrants[q].mean()) == corner


@pytest.mark.parametrize("codec,pix_fmt,size", [
    ("ffv1", "bgr0", (33, 17)), ("libx264", "yuv444p", (35, 21)), ("libx264", "yuv420p10le", (64, 48)),
    ("libx265", "yuv420p10le", (64, 48)), ("libx264", "gray", (64, 48)), ("ffv1", "gray16le", (31, 9)),
])
def test_odd_sizes_deep_and_grey_sources(tmp_path, codec, pix_fmt, size):
    path = make_clip(tmp_path / "clip.mkv", seconds=1, fps=25, size=size, codec=codec, pix_fmt=pix_fmt)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    check_sample(sample, 25, 25)
    assert (sample.width, sample.height) == size
    if "gray" in pix_fmt:
        assert torch.equal(sample.motion[:, 0], sample.motion[:, 1])
        assert torch.equal(sample.keyframes[:, 0], sample.keyframes[:, 2])


def test_solid_colour_values(tmp_path):
    colour = (200, 100, 50)
    path = make_clip(tmp_path / "solid.mkv", frames=8, size=(48, 40), codec="ffv1", color=colour)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    expected = (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.5
    assert torch.allclose(sample.keyframes[0], expected[:, None, None].expand(3, 32, 32), atol=1e-6)
    assert (sample.motion.int() - torch.tensor(colour)[None, :, None, None]).abs().max() <= 1


def smooth_pattern(i, w, h):
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def test_resize_matches_pil_bicubic(tmp_path):
    w, h = 160, 96
    path = make_clip(tmp_path / "grad.mkv", frames=4, size=(w, h), codec="ffv1", pattern=smooth_pattern)
    sample = load_video(path, keyframe_size=40, motion_size=40)
    reference = np.asarray(Image.fromarray(smooth_pattern(0, w, h)).resize((40, 40), Image.BICUBIC))
    reference = torch.from_numpy(reference.copy()).permute(2, 0, 1)
    # Keyframes take the release's own path: identical to PIL.
    assert torch.allclose(sample.keyframes[0], normalize(reference), atol=1e-6)
    # Motion frames 1-3 take swscale's bicubic; frame 0 is shared with the keyframe.
    assert torch.equal(sample.motion[0], reference)
    for i in (1, 2, 3):
        ref = torch.from_numpy(np.asarray(Image.fromarray(smooth_pattern(i, w, h)).resize((40, 40), Image.BICUBIC)).copy())
        diff = (sample.motion[i].int() - ref.permute(2, 0, 1).int()).abs()
        assert diff.float().mean() < 0.5 and diff.max() <= 3


def photo_pattern(i, w, h):
    """Photo-like: 1/f noise (luminance plus two colour axes), panned a few pixels a frame."""
    rng = np.random.default_rng(7)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1
    planes = []
    for alpha in (1.0, 1.3, 1.3):
        plane = np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**alpha, s=(h, w))
        planes.append((plane - plane.mean()) / plane.std())
    luma, a, b = planes
    luma = np.roll(luma, (3 * i, 5 * i), (0, 1))
    rgb = np.stack([luma + 0.6 * a, luma - 0.3 * a + 0.3 * b, luma - 0.7 * b], -1)
    return np.clip(128 + 45 * rgb, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("pix_fmt,options,mean,p99", [
    ("yuv420p", {}, 1.8, 6),  # BT.601 (untagged), limited range
    ("yuv420p", {"colorspace": "bt709", "color_range": "tv"}, 1.8, 6),
    ("yuvj420p", {}, 1.8, 6),  # full range
    ("yuv420p", {"colorspace": "bt709", "color_range": "pc"}, 1.8, 6),
    ("yuv420p10le", {}, 1.8, 6),
    ("yuv422p", {}, 1.8, 6),
    ("yuv444p", {}, 0.6, 2),  # no chroma siting to differ on
])
def test_motion_frames_of_yuv_sources_follow_the_release(tmp_path, pix_fmt, options, mean, p99):
    # Against the release's path on the decoded frame (its RGB with the stream's matrix and range, then
    # PIL bicubic). Measured: mean 1.3-1.7, p99 4-6 (4:4:4: 0.5, 2); the BT.601 matrix on the BT.709
    # clip gives mean 3.3, p99 12, limited range read as full 5.7, 17. What is left is chroma siting:
    # swscale resamples the subsampled chroma, the release replicates it to full size first.
    path = make_clip(tmp_path / "photo.mkv", frames=4, size=(480, 272), codec="libx264", pix_fmt=pix_fmt,
                     pattern=photo_pattern, options={"qp": "0", **options})
    sample = load_video(path, keyframe_size=96, motion_size=96)
    decoded = decoded_frames(path)
    diffs = []
    for i in (1, 2, 3):  # motion frame 0 is the keyframe's, computed the release's way
        reference = np.asarray(Image.fromarray(decoded[i]).resize((96, 96), Image.BICUBIC)).transpose(2, 0, 1)
        diffs.append(np.abs(sample.motion[i].numpy().astype(int) - reference))
    diff = np.stack(diffs)
    assert diff.mean() < mean and np.percentile(diff, 99) <= p99


def test_resize_to_different_sizes(tmp_path):
    path = make_clip(tmp_path / "clip.mp4", seconds=1, fps=25, size=(64, 48))
    sample = load_video(path, keyframe_size=40, motion_size=16)
    assert sample.keyframes.shape == (1, 3, 40, 40) and sample.motion.shape == (24, 3, 16, 16)


def test_normalize():
    frames = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(frames)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([-1.0, 51 / 255 * 2 - 1, 1.0], abs=1e-7)


def test_keyframes_equal_normalised_shared_motion_frames(clip):
    sample = load_video(clip, keyframe_size=32, motion_size=32)
    assert torch.equal(sample.keyframes[0], normalize(sample.motion[0]))


def test_audio_stream_is_ignored(tmp_path):
    sample = load_video(make_clip(tmp_path / "av.mp4", seconds=1, fps=25, audio=True), 32, 24)
    check_sample(sample, 25, 25)


@pytest.mark.parametrize("suffix", ["gif", "png"])
def test_animations_are_videos(tmp_path, suffix):
    pictures = [Image.fromarray(frame_pattern(i, 32, 24)) for i in range(12)]
    path = tmp_path / f"anim.{suffix}"
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=100, loop=0)
    sample = load_video(path, keyframe_size=32, motion_size=24)
    check_sample(sample, 12, 10)
    assert sample.keyframe_indices == [0, 10]


def test_lazy_export(clip):
    assert vqa2cli.load_video is load_video
    assert vqa2cli.VideoError is VideoError
    assert isinstance(vqa2cli.load_video(clip, 32, 24), vqa2cli.VideoSample)


EXPECTED_REASON = {
    "missing": "no such file",
    "directory": "directory",
    "empty": "empty",
    "random_bytes": "not a video",
    "text": "text",
    "text_named_mp4": "not a video",
    "audio_only": "no video stream",
    "image_png": "still image",
    "image_jpg": "still image",
    "still_gif": "still image",
    "truncated_mp4": "not a video",
    "garbled": "no decodable video frames",
    "empty_stream": "not a video",
    "unsupported_codec": "unsupported video codec",
    "unreadable": "permission denied",
}


@pytest.mark.parametrize("read", [lambda path: load_video(path, keyframe_size=32, motion_size=24), check_video],
                         ids=["load_video", "check_video"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_get_one_line_errors(bad_files, name, read, monkeypatch):
    """load_video refuses each file with a one-line reason; check_video (the cheap check) refuses the same."""
    path = bad_files[name]
    if name == "unreadable":
        deny_reads(monkeypatch, path)
    with pytest.raises(VideoError) as caught:
        read(path)
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert str(path) in message and "\n" not in message
    assert EXPECTED_REASON[name] in message
    # No PyAV/OS exception chained behind it (a CLI printing the chain would show a traceback).
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_check_video_accepts_videos_and_animations(tmp_path):
    check_video(make_clip(tmp_path / "clip.webm", seconds=0.5, fps=10, size=(32, 24), codec="libvpx-vp9"))
    pictures = [Image.fromarray(frame_pattern(i, 32, 24)) for i in range(3)]
    pictures[0].save(tmp_path / "anim.gif", save_all=True, append_images=pictures[1:], duration=100)
    check_video(tmp_path / "anim.gif")


def test_truncated_clip_with_its_index_first_loads_with_a_warning(tmp_path):
    # No B-frames: x264's output differs from run to run under load, so the cut lands at a different
    # packet each time, and with B-frames some cuts keep a frame whose predecessor in display order is
    # gone; the timestamps then span one frame more than was read, and the rate measured from them
    # (24.3 for 25) gives keyframes [0, 24]. Without reordering every cut reads whole seconds of 25.
    whole = make_clip(tmp_path / "whole.mp4", seconds=4, size=(64, 48), options={"g": "25", "bf": "0"},
                      container_options={"movflags": "faststart"})
    sample = load_video(truncate(whole, tmp_path / "cut.mp4", 0.6), 32, 24)
    assert 0 < sample.num_frames < 100
    assert len(sample.motion_indices) % 4 == 0
    assert sample.keyframe_indices == rule(sample.num_frames, 25)
    assert any("truncated" in w for w in sample.warnings)


@pytest.mark.parametrize("suffix", ["mp4", "webm"])
def test_damaged_middle_is_skipped_and_reported(tmp_path, suffix):
    whole = make_clip(tmp_path / f"whole.{suffix}", seconds=4, size=(64, 48), options={"g": "25"},
                      container_options={"movflags": "faststart"} if suffix == "mp4" else None)
    sample = load_video(garble(whole, tmp_path / f"hurt.{suffix}", 0.45, 0.1), 32, 24)
    assert 0 < sample.num_frames <= 100
    assert sample.warnings and all("\n" not in w for w in sample.warnings)
    assert sample.motion.shape[0] % 4 == 0


# ---- damage report and timing: pure functions on hand-made counts ----------------------------------

CLEAN = dict(frames=50, packets=50, declared_frames=50, declared_seconds=2.0, duration=2.0,
             times=[i * 0.04 for i in range(50)], read_error=None, rejected=0, corrupt=0)


def test_a_clean_pass_has_no_warnings():
    assert damage_warnings(**CLEAN) == []
    # 90% of the declared frames is still whole enough; decoding more frames than packets is normal
    assert damage_warnings(**{**CLEAN, "frames": 45, "packets": 45}) == []
    assert damage_warnings(**{**CLEAN, "frames": 60, "packets": 50}) == []


@pytest.mark.parametrize("change, expected", [
    ({"read_error": "end of file", "frames": 1, "packets": 1, "declared_frames": 1},
     ["stopped reading at damaged or truncated data after 1 frame (end of file)"]),
    ({"frames": 44, "packets": 44},
     ["decoded 44 of the 50 frames the container declares (file truncated or damaged)"]),
    ({"declared_frames": 0, "declared_seconds": 4.0, "duration": 1.0},
     ["decoded 1.00 s of the 4.00 s the container declares (file truncated or damaged)"]),
    ({"frames": 48}, ["decoded 48 frames from 50 packets"]),
    ({"frames": 48, "rejected": 2}, ["skipped 2 corrupt packets"]),  # the skipped packets explain it
    ({"corrupt": 1}, ["1 frame decoded with errors"]),
    ({"times": [0.0, 0.04, 0.08, 1.08, 1.12, 3.12, 3.16]},
     ["2 gaps in the timestamps, widest between 1.12 s and 3.12 s "
      "(missing or damaged data, or a long pause in variable-rate video)"]),
    ({"times": [10.0, 10.04, 10.08, 10.12, 11.12]},  # seconds from the first frame
     ["1 gap in the timestamps, widest between 0.12 s and 1.12 s "
      "(missing or damaged data, or a long pause in variable-rate video)"]),
])
def test_damage_warnings_by_hand(change, expected):
    assert damage_warnings(**{**CLEAN, **change}) == expected


def test_slow_regular_frames_are_not_gaps():
    # a slideshow at 0.6 s a frame: over 0.5 s, but not 10 times the median interval
    assert damage_warnings(**{**CLEAN, "times": [0.6 * i for i in range(10)]}) == []
    # a pause of 10 median intervals exactly is not a gap either; just over is
    assert damage_warnings(**{**CLEAN, "times": [0.0, 0.1, 0.2, 1.2]}) == []
    assert len(damage_warnings(**{**CLEAN, "times": [0.0, 0.1, 0.2, 1.21]})) == 1


def test_warnings_come_in_a_fixed_order():
    lines = damage_warnings(frames=10, packets=40, declared_frames=40, declared_seconds=1.6, duration=0.4,
                            times=[0.0, 0.04, 0.08, 2.0], read_error="i/o error", rejected=3, corrupt=2)
    assert [line.split(" ")[0] for line in lines] == ["stopped", "decoded", "1", "skipped", "2"]


def test_stream_duration_by_hand():
    times = [0.0, 0.04, 0.08]
    assert stream_duration(times, 0.04, 3, 25.0) == pytest.approx(0.12)
    assert stream_duration(times, 0.0, 3, 25.0) == pytest.approx(0.12)  # the mean interval stands in
    assert stream_duration([0.0, 0.5, 2.0], 0.0, 3, 25.0) == pytest.approx(3.0)
    assert stream_duration([], 0.0, 10, 25.0) == pytest.approx(0.4)  # no timestamps: frames / fps
    assert stream_duration([1.0], 0.04, 1, 25.0) == pytest.approx(0.04)


def _pixels(keyframes: torch.Tensor) -> np.ndarray:
    """Normalised keyframes back to uint8 HxWx3."""
    return (keyframes * 0.5 + 0.5).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_fragment_keyframes_are_crops_of_the_frame_at_its_own_resolution(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = make_clip(tmp_path / "noise.mkv", frames=4, size=(96, 64), codec="ffv1", pattern=lambda i, w, h: image)
    sample = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4)
    # The 96x64 frame cut 4 x 4 has cells 24 x 16 px centred at x = 12, 36, 60, 84 and y = 8, 24, 40, 56;
    # 8 px crops around them start at x = 8, 32, 56, 80 and y = 4, 20, 36, 52.
    expected = np.concatenate([np.concatenate([image[y:y + 8, x:x + 8] for x in (8, 32, 56, 80)], axis=1)
                               for y in (4, 20, 36, 52)], axis=0)
    assert np.array_equal(_pixels(sample.keyframes)[0], expected) and sample.keyframe_fragments == 4
    whole = load_video(path, keyframe_size=32, motion_size=16)
    assert torch.equal(sample.motion, whole.motion)  # the motion stream sees whole frames either way


def test_fragment_places_move_each_crop_inside_its_cell_the_same_in_every_keyframe(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = make_clip(tmp_path / "still.mkv", frames=30, fps=10, size=(96, 64), codec="ffv1",
                     pattern=lambda i, w, h: image)

    def keyframes(places):
        sample = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_places=places)
        assert len(sample.keyframe_indices) == 3
        return _pixels(sample.keyframes)

    def mosaic(xs, ys):
        return np.concatenate([np.concatenate([image[y:y + 8, x:x + 8] for x in xs], axis=1) for y in ys], axis=0)

    # Cells 24 x 16 px: 8 px crops flush with each cell's top edge (row place 0) and right edge (column place 1)
    top_right = np.stack([np.zeros((4, 4)), np.ones((4, 4))], axis=-1)
    assert all(np.array_equal(k, mosaic((16, 40, 64, 88), (0, 16, 32, 48))) for k in keyframes(top_right))
    assert all(np.array_equal(k, mosaic((0, 24, 48, 72), (8, 24, 40, 56))) for k in keyframes(1 - top_right))
    # 0.5 is the centres, exactly what scoring takes
    centred = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4)
    assert np.array_equal(keyframes(np.full((4, 4, 2), 0.5)), _pixels(centred.keyframes))
    # each cell on its own: only the one moved crop changes
    moved = np.full((4, 4, 2), 0.5)
    moved[2, 1] = (0.0, 1.0)
    changed = keyframes(moved)[0] != _pixels(centred.keyframes)[0]
    assert changed[16:24, 8:16].any() and not np.delete(np.delete(changed, np.s_[8:16], 1), np.s_[16:24], 0).any()


def test_fragment_shifts_cut_every_keyframe_at_each_shifted_place_centres_first(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = make_clip(tmp_path / "still.mkv", frames=30, fps=10, size=(96, 64), codec="ffv1",
                     pattern=lambda i, w, h: image)
    sample = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_shifts=3)
    # Cells 24 x 16 px with 8 px crops leave 16 px of room across and 8 down. Places 1/6, 1/2, 5/6 move a crop
    # by floor((place - 1/2) * room): -6, 0, +5 px across (x from 8, 32, 56, 80) and -3, 0, +2 px down
    # (y from 4, 20, 36, 52).
    def mosaic(dx, dy):
        return np.concatenate([np.concatenate([image[y + dy:y + dy + 8, x + dx:x + dx + 8] for x in (8, 32, 56, 80)],
                                              axis=1) for y in (4, 20, 36, 52)], axis=0)

    views = sample.keyframe_views
    assert views.shape == (9, 3, 3, 32, 32) and torch.equal(views[0], sample.keyframes)
    cut = [_pixels(view) for view in views]
    assert all(np.array_equal(k, mosaic(0, 0)) for k in cut[0])  # the centres: exactly the one-view keyframes
    assert torch.equal(sample.keyframes, load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4).keyframes)
    expected = [mosaic(dx, dy) for dy in (-3, 0, 2) for dx in (-6, 0, 5) if (dx, dy) != (0, 0)]
    assert all(np.array_equal(k, want) for view, want in zip(cut[1:], expected) for k in view)
    one = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4)
    assert one.keyframe_views is None and torch.equal(sample.motion, one.motion)


def test_a_sample_with_views_pickles_them_once(tmp_path):
    # Decode workers and Ray ship samples pickled; `keyframes` is view 0 of `keyframe_views`.
    image = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = make_clip(tmp_path / "still.mkv", frames=20, fps=10, size=(96, 64), codec="ffv1",
                     pattern=lambda i, w, h: image)
    sample = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_shifts=3)
    shipped = pickle.dumps(sample)
    tensors = sample.keyframe_views.numel() * 4 + sample.motion.numel()
    assert tensors < len(shipped) < tensors + 4096
    back = pickle.loads(shipped)
    assert torch.equal(back.keyframe_views, sample.keyframe_views) and torch.equal(back.keyframes, sample.keyframes)
    assert back.keyframes.data_ptr() == back.keyframe_views.data_ptr()  # a view again, not a copy
    one = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4)
    assert torch.equal(pickle.loads(pickle.dumps(one)).keyframes, one.keyframes)


def test_fragment_shifts_are_checked(tmp_path):
    path = make_clip(tmp_path / "c.mkv", frames=4, size=(96, 64), codec="ffv1")
    for kwargs, message in (({"keyframe_fragments": 4, "fragment_shifts": 2}, "odd number from 1, got 2"),
                            ({"keyframe_fragments": 4, "fragment_shifts": 0}, "odd number from 1, got 0"),
                            ({"fragment_shifts": 3}, "fragment_shifts needs keyframe_fragments"),
                            ({"keyframe_fragments": 4, "fragment_shifts": 3,
                              "fragment_places": np.full((4, 4, 2), 0.5)}, "takes no fragment_shifts")):
        with pytest.raises(ValueError, match=message):
            load_video(path, keyframe_size=32, motion_size=16, **kwargs)
    shifted = Sampling(keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_shifts=3)
    with pytest.raises(ValueError, match="takes no fragment_shifts"):  # not silently one view
        shifted.load(path, fragment_places=np.full((4, 4, 2), 0.5))


def test_fragment_places_are_checked(tmp_path):
    path = make_clip(tmp_path / "c.mkv", frames=4, size=(96, 64), codec="ffv1")
    for places, message in ((np.full((2, 2, 2), 0.5), r"shape \(4, 4, 2\), got \(2, 2, 2\)"),
                            (np.full((4, 4, 2), 1.5), r"lie in \[0, 1\]"),
                            (np.full((4, 4, 2), np.nan), r"lie in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_places=places)
    with pytest.raises(ValueError, match="fragment_places needs keyframe_fragments"):
        load_video(path, keyframe_size=32, motion_size=16, fragment_places=np.full((4, 4, 2), 0.5))


def test_fragments_leave_motion_frames_whole_at_the_keyframe_size_too(tmp_path):
    path = make_clip(tmp_path / "p.mkv", frames=8, size=(96, 64), codec="ffv1")
    fragments = load_video(path, keyframe_size=32, motion_size=32, keyframe_fragments=2)
    # a keyframe's pixels are not its motion frame: every motion frame is the plain motion resize, as when
    # the two sizes differ
    apart = load_video(path, keyframe_size=64, motion_size=32)
    assert torch.equal(fragments.motion, apart.motion)
    assert not torch.equal(fragments.motion, load_video(path, keyframe_size=32, motion_size=32).motion)


def test_a_frame_smaller_than_the_keyframe_is_resized_whole_for_fragments(tmp_path):
    path = make_clip(tmp_path / "small.mkv", frames=4, size=(40, 24), codec="ffv1")
    fragments = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4)
    assert torch.equal(fragments.keyframes, load_video(path, keyframe_size=32, motion_size=16).keyframes)


def test_keyframe_fragments_must_divide_the_keyframe(tmp_path):
    path = make_clip(tmp_path / "c.mkv", frames=4, codec="ffv1")
    with pytest.raises(ValueError, match="keyframe_fragments must be 0 or divide keyframe_size 32, got 3"):
        load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=3)


def test_frames_too_small_to_cut_give_one_view(tmp_path):
    path = make_clip(tmp_path / "small.mkv", frames=4, size=(40, 24), codec="ffv1")
    sample = load_video(path, keyframe_size=32, motion_size=16, keyframe_fragments=4, fragment_shifts=3)
    assert sample.keyframe_views is None  # every view would be the same whole-frame resize
    assert torch.equal(sample.keyframes, load_video(path, keyframe_size=32, motion_size=16).keyframes)
