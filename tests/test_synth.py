"""vqa2 synth: determinism, what each distortion does to frames, label semantics, files, user clips."""

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from vqa2cli import synth
from vqa2cli.data import load_dataset
from vqa2cli.errors import SetupError

SMALL = dict(width=64, height=64, fps=8.0, seconds=2.0)  # 16 frames a clip


def small_settings(**changes):
    return synth.SynthSettings(**{"count": 8, "seed": 5, **SMALL, **changes})


def decode(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def clean_clip(kind="texture", seed=3, n_frames=16, size=64):
    rng = np.random.default_rng(seed)
    clip = synth.ProceduralClip(kind, rng, size, size, n_frames, synth.ContentSettings(speed=(1.5, 2.5)))
    return [clip.frame(i) for i in range(n_frames)]


def test_leaves_content_is_flat_regions_and_sharp_edges_at_any_detail():
    # Dead leaves: most neighbouring pixels differ little (inside a leaf) and a few a lot (its edge), so the
    # tail of the differences stands far above their median; in 1/f textures it does not.
    def edge_contrast(kind, detail, seed):
        settings = synth.ContentSettings(detail=(detail, detail))
        y = synth.ProceduralClip(kind, np.random.default_rng(seed), 64, 64, 2, settings).frame(0).mean(-1)
        steps = np.abs(np.diff(y, axis=1))
        return np.quantile(steps, 0.99) / np.median(steps)

    for detail in (0.9, 1.8):
        for seed in range(3):
            assert edge_contrast("leaves", detail, seed) > 6
            assert edge_contrast("texture", detail, seed) < 5


def distort(frames, name, severity, extent="whole", fps=8.0, seed=0, mode=None):
    """`frames` with one distortion; `mode` picks a variant (noise: gaussian/sensor, stutter: duplicate/freeze,
    flicker: sine/random) instead of the one the seed draws."""
    h, w = frames[0].shape[:2]
    distortion = synth.AppliedDistortion(name, severity, extent)
    if name == "compression":
        return synth.Compressor(distortion, np.random.default_rng(seed), fps, len(frames))(list(frames))
    renderer = synth.DistortionRenderer(distortion, np.random.default_rng(seed), w, h, fps, len(frames))
    if mode is not None:
        renderer.mode = mode
        if name == "stutter":
            renderer.holds = (renderer._hold_schedule if mode == "duplicate" else renderer._freeze_schedule)(
                severity, fps)
    return [renderer(frame, i) for i, frame in enumerate(frames)]


def luma(frame):
    return frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114


def laplacian_energy(frames):
    """Mean squared Laplacian: the high-frequency energy of the frames."""
    total = 0.0
    for frame in frames:
        y = luma(np.asarray(frame, dtype=np.float64))
        lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
        total += float(np.mean(lap**2))
    return total / len(frames)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    meta = synth.generate_dataset(out, small_settings())
    return out, meta


# ---------------------------------------------------------------- determinism


def test_same_seed_same_labels_and_frames(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synth.generate_dataset(again, small_settings())
    for name in ("labels.csv", "stage1.csv", "stage2.csv", "stage3.csv", "stage2.json", "stage3.json", "manifest.csv"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert videos == sorted(p.name for p in (again / "videos").iterdir()) and len(videos) == 8
    for name in videos:
        np.testing.assert_array_equal(decode(out / "videos" / name), decode(again / "videos" / name))


def test_parallel_workers_make_the_same_dataset(dataset, tmp_path):
    out, meta = dataset
    parallel = synth.generate_dataset(tmp_path / "parallel", small_settings(), jobs=2)
    assert parallel["clips"] == meta["clips"] == 8
    for name in ("labels.csv", "stage1.csv", "stage3.json", "manifest.csv"):
        assert (out / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    for name in sorted(p.name for p in (out / "videos").iterdir()):
        np.testing.assert_array_equal(decode(out / "videos" / name), decode(tmp_path / "parallel" / "videos" / name))


def test_other_seed_other_data(dataset, tmp_path):
    out, _ = dataset
    other = synth.plan_dataset(small_settings(seed=6))
    assert synth.label_files(other, 6)["manifest.csv"] != (out / "manifest.csv").read_text()


# ---------------------------------------------------------------- distortions on frames


def test_blur_lowers_high_frequency_energy_more_with_severity():
    frames = clean_clip()
    energies = [laplacian_energy(frames)] + [laplacian_energy(distort(frames, "blur", s)) for s in (1, 2, 4)]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.1 * energies[0]


def test_noise_raises_variance_more_with_severity():
    frames = clean_clip("gradient")
    residual = lambda s, mode: np.array(distort(frames, "noise", s, mode=mode)) - np.array(frames)  # noqa: E731
    gaussian = [float(np.std(residual(s, "gaussian"))) for s in (1, 2, 4)]
    assert gaussian == pytest.approx([6.0, 12.0, 24.0], rel=0.1)
    sensor = [residual(s, "sensor") for s in (1, 2, 4)]
    assert float(np.std(sensor[0])) < float(np.std(sensor[1])) < float(np.std(sensor[2]))
    assert laplacian_energy(distort(frames, "noise", 1)) > laplacian_energy(frames)


def test_sensor_noise_grows_with_brightness_and_has_blotchy_chroma():
    dark, bright = np.full((64, 64, 3), 20.0, np.float32), np.full((64, 64, 3), 230.0, np.float32)
    noise = {name: np.array(distort([frame] * 4, "noise", 3, mode="sensor")) - frame
             for name, frame in (("dark", dark), ("bright", bright))}
    assert np.std(luma(noise["bright"])) > 1.5 * np.std(luma(noise["dark"]))
    chroma = noise["bright"][..., 2] - luma(noise["bright"])  # blue-difference: constant over 2x2 blocks
    assert np.allclose(chroma[:, 0::2, 0::2], chroma[:, 1::2, 1::2], atol=1e-3)


def test_motion_blur_smears_along_one_direction():
    frame = clean_clip("texture")[0]
    renderer = synth.DistortionRenderer(synth.AppliedDistortion("motion_blur", 4, "whole"),
                                        np.random.default_rng(0), 64, 64, 8.0, 1)
    smeared = renderer(frame, 0)
    dy, dx = renderer.offsets[-1][0] - renderer.offsets[0][0], renderer.offsets[-1][1] - renderer.offsets[0][1]
    along = np.abs(np.diff(luma(smeared), axis=0 if abs(dy) >= abs(dx) else 1)).mean()
    across = np.abs(np.diff(luma(smeared), axis=1 if abs(dy) >= abs(dx) else 0)).mean()
    assert along < across and laplacian_energy([smeared]) < 0.5 * laplacian_energy([frame])


def test_upscaling_loses_detail_more_with_severity():
    frames = clean_clip("texture", n_frames=2, size=128)
    energies = [laplacian_energy(frames)] + [laplacian_energy(distort(frames, "upscaling", s)) for s in (1, 4)]
    assert energies[0] > energies[1] > energies[2] and energies[2] < 0.2 * energies[0]


@pytest.mark.parametrize("seed", range(5))  # the codec is drawn per clip: x264, VP9 or MPEG-4
def test_compression_by_a_real_encoder_loses_detail_and_is_repeatable(seed):
    frames = clean_clip("texture", n_frames=8, size=96)
    mild, strong = (distort(frames, "compression", s, seed=seed) for s in (1, 4))
    error = lambda out: float(np.mean(np.abs(np.array(out) - np.array(frames))))  # noqa: E731
    assert 0 < error(mild) < error(strong)
    assert laplacian_energy(strong) < laplacian_energy(frames)
    again = distort(frames, "compression", 4, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(strong, again))  # single-threaded: the same frames
    half = distort(frames, "compression", 4, extent="second half", seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(half[:4], frames[:4]))


def test_x264_compression_does_not_depend_on_what_the_process_encoded_before():
    # With x264's macroblock tree on, the same frames came out differently after other encodes (X264_REPEATABLE).
    def codec(seed):
        return synth.Compressor(synth.AppliedDistortion("compression", 2.5, "whole"), np.random.default_rng(seed),
                                8.0, 24).codec

    seed = next(s for s in range(20) if codec(s) == "libx264")
    clip, other = clean_clip("texture", n_frames=24, size=160), clean_clip("shapes", n_frames=24, size=224)
    first = distort(clip, "compression", 2.5, seed=seed)
    for severity in (1, 3, 4):
        distort(other, "compression", severity, seed=seed)
    again = distort(clip, "compression", 2.5, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def blockiness(frame):
    """Mean luma step across 8-px block borders over the mean step inside blocks (1 when there are no blocks)."""
    y = luma(np.asarray(frame, dtype=np.float64))
    steps = np.abs(np.diff(y, axis=1))
    border = steps[:, 7::8].mean()
    inside = np.delete(steps, np.s_[7::8], axis=1).mean()
    return border / inside


def test_blocking_creates_8x8_block_edges():
    frame = clean_clip("texture")[0]
    clean, mild, strong = blockiness(frame), blockiness(distort([frame], "blocking", 1.5)[0]), blockiness(
        distort([frame], "blocking", 4)[0]
    )
    assert clean < 1.3
    assert strong > mild > clean
    assert strong > 2.5


def test_exposure_moves_brightness_the_right_way():
    frames = clean_clip("shapes")
    base = np.mean([luma(f).mean() for f in frames])
    over = [np.mean([luma(f).mean() for f in distort(frames, "overexposure", s)]) for s in (1, 4)]
    under = [np.mean([luma(f).mean() for f in distort(frames, "underexposure", s)]) for s in (1, 4)]
    assert base < over[0] < over[1] and over[1] > 200
    assert base > under[0] > under[1] and under[1] < 0.5 * base
    # over-exposure clips highlights: a share of pixels saturates
    assert np.mean(np.array(distort(frames, "overexposure", 4)) >= 254.5) > 0.3


def test_flicker_makes_frame_brightness_oscillate():
    frames = clean_clip("texture", n_frames=32)
    means = lambda fs: np.array([luma(np.clip(f, 0, 255)).mean() for f in fs])  # noqa: E731
    clean = means(frames)
    for severity, minimum in ((1, 3.0), (4, 15.0)):
        flickered = means(distort(frames, "flicker", severity))
        swing = np.std(flickered - clean)
        assert swing > minimum, (severity, swing)
        # it oscillates: frame-to-frame changes of brightness change sign again and again
        assert np.sum(np.diff(np.sign(np.diff(flickered))) != 0) >= 8
    assert np.std(np.diff(clean)) < 1.0


def count_repeats(frames):
    return sum(np.array_equal(a, b) for a, b in zip(frames, frames[1:]))


@pytest.mark.parametrize("mode", ["duplicate", "freeze"])
def test_stutter_repeats_frames_and_drops_others(mode):
    frames = clean_clip(n_frames=48)
    assert count_repeats(frames) == 0
    mild, severe = (count_repeats(distort(frames, "stutter", s, fps=12, mode=mode)) for s in (1, 4))
    assert 0 < mild < severe
    renderer = synth.DistortionRenderer(synth.AppliedDistortion("stutter", 3, "whole"), np.random.default_rng(0),
                                        64, 64, 12.0, 48)
    renderer.holds = renderer._hold_schedule(3, 12.0) if mode == "duplicate" else renderer._freeze_schedule(3, 12.0)
    out = [renderer(frame, i) for i, frame in enumerate(frames)]
    assert renderer.holds
    for i, frame in enumerate(out):
        # a held frame shows an earlier source frame; then playback resumes at the source's own time: the
        # frames in between are dropped, not delayed
        np.testing.assert_array_equal(frame, frames[renderer.holds.get(i, i)])
    assert any(i + 1 not in renderer.holds and i + 1 < 48 for i in renderer.holds)
    if mode == "duplicate":  # a lower frame rate: each shown frame held round(1 + 3) = 4 frames
        shown = [renderer.holds.get(i, i) for i in range(48)]
        runs = [len(list(group)) for _, group in itertools.groupby(shown)]
        assert set(runs[1:-1]) == {4}


def test_shake_translates_content_per_frame():
    frames = clean_clip(n_frames=16)
    h, w = frames[0].shape[:2]
    renderer = synth.DistortionRenderer(synth.AppliedDistortion("shake", 3, "whole"), np.random.default_rng(1),
                                        w, h, 8.0, 16)
    moved = 0
    m = renderer.max_shift
    for i, frame in enumerate(frames):
        shaken = renderer(frame, i)
        dy, dx = renderer.shifts[i]
        # the shaken frame is the clean one displaced by (dy, dx): compare away from the borders
        np.testing.assert_array_equal(shaken[m:-m, m:-m], frame[m + dy : h - m + dy, m + dx : w - m + dx])
        moved += (dy, dx) != (0, 0)
    assert moved >= 12 and m == round(0.02 * 3 * 64)


def test_partial_extent_leaves_the_other_half_untouched():
    frames = clean_clip(n_frames=16)
    for name in ("blur", "motion_blur", "noise", "upscaling", "flicker", "shake", "blocking"):
        out = distort(frames, name, 3, extent="second half")
        assert all(np.array_equal(a, b) for a, b in zip(out[:8], frames[:8])), name
        assert all(not np.array_equal(a, b) for a, b in zip(out[8:], frames[8:])), name
    out = distort(frames, "stutter", 4, extent="first half")
    assert all(not np.array_equal(a, b) for a, b in zip(out[8:], out[9:]))
    assert count_repeats(out[:8]) > 0


def test_distortions_survive_encoding(dataset):
    """In the written files: stutter clips hold repeated frames, blurred clips are smoother than clean ones."""
    out, _ = dataset
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    for row in rows:
        frames = decode(out / row["video"]).astype(np.float64)
        assert frames.shape[1:] == (64, 64, 3) and len(frames) == 16
        steps = [np.abs(a - b).mean() for a, b in zip(frames, frames[1:])]
        if "stutter" in row["distortions"]:
            assert min(steps) < 0.5  # a held frame
        if row["distortions"] == "none":
            assert min(steps) > 0.5  # clean content moves every frame


def test_grain_is_camera_noise_in_the_clean_content_and_changes_nothing_else(tmp_path):
    plain = synth.plan_dataset(small_settings(count=40))
    grainy = synth.plan_dataset(small_settings(count=40, content=synth.ContentSettings(grain=(2.0, 4.0))))
    assert [(p.source, p.distortions, p.width, p.mos) for p in plain] == \
        [(p.source, p.distortions, p.width, p.mos) for p in grainy]  # labels as without grain
    assert all(p.grain == 0 for p in plain) and all(2 <= p.grain <= 4 for p in grainy)
    assert len({p.grain for p in grainy}) > 30  # drawn per clip
    settings = small_settings(content=synth.ContentSettings(grain=(3.0, 3.0)))
    plan = synth.plan_dataset(settings)[0]
    with_grain = np.array(list(synth.clean_frames(plan, settings)))
    without = np.array(list(synth.clean_frames(replace(plan, grain=0.0), settings)))
    residual = with_grain - without
    # Sensor noise of sigma 3: luma sigma 3 * sqrt(0.2 + 0.8 L) <= 3, chroma adds to each channel.
    assert 1.0 < residual.std() < 6.0 and abs(residual.mean()) < 0.2
    assert not np.array_equal(residual[0], residual[1])  # new noise every frame
    synth.generate_dataset(tmp_path / "d", settings)
    manifest = list(csv.DictReader(open(tmp_path / "d" / "manifest.csv")))
    assert {row["grain"] for row in manifest} == {"3.00"}
    assert {row["video"]: row["mos"] for row in manifest} == \
        {p.video: f"{p.mos:.2f}" for p in synth.plan_dataset(small_settings())}


def test_grain_range_is_checked():
    with pytest.raises(SetupError, match="--grain"):
        synth.ContentSettings(grain=(4.0, 2.0)).validate()


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("name", list(synth.DISTORTIONS))
def test_mos_falls_with_severity(name):
    severities = np.linspace(1, 4, 13)
    mos = [synth.mos_for([(s, "whole")]) for s in severities]
    assert all(a > b for a, b in zip(mos, mos[1:]))
    assert synth.mos_for([]) == synth.CLEAN_MOS
    assert 75 < mos[0] < 85 and 10 < mos[-1] < 25  # from 'high/good' down to 'low'
    assert synth.mos_for([(3, "first half")]) > synth.mos_for([(3, "whole")])


def test_two_distortions_are_worse_than_either():
    both = synth.mos_for([(2.0, "whole"), (3.0, "whole")])
    assert both < min(synth.mos_for([(2.0, "whole")]), synth.mos_for([(3.0, "whole")]))
    assert both == pytest.approx(90 * (1 - synth.impairment(2.0)) * (1 - synth.impairment(3.0)))


def test_plan_is_balanced():
    plans = synth.plan_dataset(small_settings(count=400))
    counts = {name: 0 for name in synth.DEFAULT_DISTORTIONS}
    for plan in plans:
        kinds = [d.type.kind for d in plan.distortions]
        assert len(kinds) <= 2 and len(set(kinds)) == len(kinds)  # at most one spatial and one motion
        for d in plan.distortions:
            counts[d.name] += 1
            assert 1 <= d.severity <= 4 and d.extent in synth.EXTENTS
    for kind in ("spatial", "motion"):  # two-distortion clips add one of each kind, so kinds differ in totals
        of_kind = [n for name, n in counts.items() if synth.DISTORTIONS[name].kind == kind]
        assert min(of_kind) > 0.7 * max(of_kind), counts
    answers = [a for plan in plans for q, a in synth._questions(plan, np.random.default_rng(plan.index))
               if q.startswith("Is there")]
    assert answers.count("Yes.") == answers.count("No.")
    sources = {plan.source for plan in plans}
    assert sources == {f"procedural:{k}" for k in synth.DEFAULT_KINDS}


def test_label_files_are_valid_and_consistent(dataset):
    out, meta = dataset
    manifest = {row["video"]: row for row in csv.DictReader(open(out / "manifest.csv"))}
    labels = list(csv.DictReader(open(out / "labels.csv")))
    assert [row["path"] for row in labels] == list(manifest)
    for row in labels:
        assert not Path(row["path"]).is_absolute() and (out / row["path"]).is_file()
        assert 0 <= float(row["mos"]) <= 100
        assert row["mos"] == manifest[row["path"]]["mos"]
    # every stage file is read by the fine-tuning data reader without a single problem
    for name, stage in (("stage1.csv", 1), ("stage2.csv", 2), ("stage3.csv", 3),
                        ("stage1.json", 1), ("stage2.json", 2), ("stage3.json", 3)):
        data = load_dataset(out / name, stage, mos_range=(0, 100))
        assert data.records and not data.problems, (name, data.problems[:3])
    for row in csv.DictReader(open(out / "stage1.csv")):
        distortions = manifest[row["video"]]["distortions"]
        name = next(n for n, d in synth.DISTORTIONS.items() if d.phrase == row["distortion"])
        assert name in distortions and synth.DISTORTIONS[name].kind == row["kind"]
    records = json.loads((out / "stage2.json").read_text())
    assert {r["image"] for r in records} == set(manifest)
    assert all(r["gt_score"] == float(manifest[r["image"]]["mos"]) for r in records)
    assert meta["clips"] == 8 and json.loads((out / "synth.json").read_text())["settings"]["seed"] == 5


def test_stage3_answers_follow_the_manifest(dataset):
    out, _ = dataset
    manifest = {row["video"]: row for row in csv.DictReader(open(out / "manifest.csv"))}
    for row in csv.DictReader(open(out / "stage3.csv")):
        distortions = manifest[row["video"]]["distortions"]
        present = {d.split(":")[0]: d.split(":")[2] for d in distortions.split(";")} if distortions != "none" else {}
        for name, kind in synth.DISTORTIONS.items():
            if row["question"] == f"Is there {kind.phrase} in this video?":
                assert row["answer"] == ("Yes." if name in present else "No.")
            if row["question"] == f"When does the {kind.phrase} occur?":
                expected = {"whole": "Throughout", "first half": "In the first half",
                            "second half": "In the second half"}[present[name]]
                assert row["answer"].startswith(expected)


# ---------------------------------------------------------------- user clips and the command


def write_clip(path, width=96, height=72, fps=30, seconds=3):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(fps * seconds)):
            x = np.arange(width)[None, :, None]
            image = ((x * 3 + i * 4 + np.arange(height)[:, None, None] * 2) % 256).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(image, (height, width, 3)).copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_user_clips_are_cropped_resized_and_distorted(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    write_clip(clips / "sub" / "a.mp4")
    write_clip(clips / "short.mp4", seconds=0.2)
    (clips / "broken.mp4").write_bytes(b"not a video")
    meta = synth.generate_dataset(tmp_path / "out", small_settings(count=4, fps=10.0, seconds=1.0), clips_dir=clips)
    assert meta["clips"] == 4 and not meta["failed"]
    broken, short = meta["skipped_sources"]
    assert "broken.mp4: cannot read video" in broken and "short.mp4: too short" in short
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    assert {row["source"] for row in rows} == {"sub/a.mp4"}
    for row in rows:
        frames = decode(tmp_path / "out" / row["video"])
        assert frames.shape == (10, 64, 64, 3)
        assert 0 <= float(row["start"]) <= 3 - 1.0


def interrupt_at(count, reported):
    """An on_clip that notes each clip reported and raises KeyboardInterrupt (as Ctrl-C would) at the count-th."""

    def on_clip(plan, error):
        reported.append(plan.video)
        if len(reported) == count:
            raise KeyboardInterrupt

    return on_clip


def test_interrupted_run_labels_the_clips_it_made(tmp_path):
    made = []
    with pytest.raises(KeyboardInterrupt):
        synth.generate_dataset(tmp_path / "out", small_settings(), on_clip=interrupt_at(2, made))
    labels = list(csv.DictReader(open(tmp_path / "out" / "labels.csv")))
    assert [row["path"] for row in labels] == made
    assert json.loads((tmp_path / "out" / "synth.json").read_text())["interrupted"] is True
    assert sorted(p.name for p in (tmp_path / "out" / "videos").iterdir()) == ["clip_00000.mp4", "clip_00001.mp4"]


def test_interrupted_parallel_run_labels_every_clip_it_finished(tmp_path):
    reported = []
    with pytest.raises(KeyboardInterrupt):
        synth.generate_dataset(tmp_path / "out", small_settings(count=40), on_clip=interrupt_at(2, reported), jobs=2)
    labelled = [row["path"] for row in csv.DictReader(open(tmp_path / "out" / "labels.csv"))]
    made = sorted("videos/" + p.name for p in (tmp_path / "out" / "videos").iterdir())
    # The clips being made when it stopped are finished and labelled; the ones not started are not made.
    assert labelled == made and labelled[:2] == reported and len(made) < 40
    assert labelled == [f"videos/clip_{i:05d}.mp4" for i in range(len(made))]


def test_clips_folder_without_videos_is_a_setup_error(tmp_path):
    (tmp_path / "clips").mkdir()
    with pytest.raises(SetupError, match="no video files"):
        synth.generate_dataset(tmp_path / "out", small_settings(), clips_dir=tmp_path / "clips")


def test_command_makes_a_dataset_and_refuses_a_full_folder(tmp_path, vqa2):
    out = tmp_path / "data"
    code, _, err = vqa2("synth", out, "--count", 3, "--size", "32x32", "--seconds", 1, "--fps", 8,
                        "--seed", 2, "--content", "shapes", "--speed", "1,2", "--objects", "1")
    assert code == 0, err
    assert "made 3 clip(s)" in err
    assert all((out / name).is_file() for name in ("labels.csv", "stage1.csv", "stage2.csv", "stage3.csv"))
    assert {row["source"] for row in csv.DictReader(open(out / "manifest.csv"))} == {"procedural:shapes"}
    code, _, err = vqa2("synth", out, "--count", 3)
    assert code == 2 and err.strip().count("\n") == 0 and "not empty" in err
    code, _, err = vqa2("synth", tmp_path / "x", "--size", "31x32")
    assert code == 2 and "even" in err
    code, _, err = vqa2("synth", tmp_path / "y", "--jobs", "0")
    assert code == 2 and "--jobs" in err


# ---------------------------------------------------------------- photographs


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two 'photographs': textures with edges, saved as PNG and JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name, seed in (("a.png", 1), ("sub/b.jpg", 2)):
        rng = np.random.default_rng(seed)
        canvas = synth._canvas(rng, "leaves", 200, 300, synth.ContentSettings())
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray((canvas * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_photo_clips_pan_over_the_photo_at_its_own_detail(photos):
    settings = synth.ContentSettings(speed=(2.0, 2.0), objects=(0, 0))
    clip = synth.PhotoClip(photos / "a.png", np.random.default_rng(0), 96, 64, 12, settings)
    frames = [clip.frame(i) for i in range(12)]
    assert frames[0].shape == (64, 96, 3) and frames[0].dtype == np.float32
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))  # the camera moves every frame
    again = synth.PhotoClip(photos / "a.png", np.random.default_rng(0), 96, 64, 12, settings)
    assert np.array_equal(again.frame(5), frames[5])
    # the frame covers 45-80% of the scaled photo, so it is never upscaled beyond what it holds
    assert clip.photo.width >= 96 / 0.8 - 1 and clip.photo.height >= 64 / 0.8 - 1


def test_photo_scale_sets_how_many_photo_pixels_make_one_frame_pixel(photos):
    settings = synth.ContentSettings(objects=(0, 0))
    for name in ("a.png", "sub/b.jpg"):  # 300 x 200 px
        sizes = {scale: synth.PhotoClip(photos / name, np.random.default_rng(0), 96, 64, 4, settings, scale).photo.size
                 for scale in (1.0, 2.0, 3.0)}
        assert sizes[1.0] == (300, 200)  # the photo's own pixels (the JPEG decoded whole)
        assert sizes[2.0] == (150, 100)
        # 3x would leave the frame no room to move: it covers at most 80% of the photo, 96 / 0.8 = 120 px
        assert sizes[3.0] == (120, 80)


def test_photo_scale_is_drawn_per_photo_clip_and_changes_no_label(photos):
    plain = synth.plan_dataset(small_settings(count=60, content=synth.ContentSettings(kinds=("photo", "shapes"))),
                               images=["a.png", "sub/b.jpg"])
    scaled = synth.plan_dataset(small_settings(count=60, content=synth.ContentSettings(
        kinds=("photo", "shapes"), photo_scale=(1.0, 6.0))), images=["a.png", "sub/b.jpg"])
    assert [(p.source, p.distortions, p.width, p.mos) for p in plain] == \
        [(p.source, p.distortions, p.width, p.mos) for p in scaled]
    assert all(p.photo_scale == 0 for p in plain)
    photo_scales = [p.photo_scale for p in scaled if p.source.startswith("photo:")]
    assert all(p.photo_scale == 0 for p in scaled if not p.source.startswith("photo:"))
    assert len(photo_scales) > 15 and all(1 <= v <= 6 for v in photo_scales)
    # log-uniform: about as many clips below sqrt(6) = 2.45 as above it
    assert 0.25 < np.mean(np.array(photo_scales) < 6**0.5) < 0.75
    for bad in ((0.5, 2.0), (3.0, 2.0)):
        with pytest.raises(SetupError, match="--photo-scale"):
            synth.ContentSettings(photo_scale=bad).validate()


def test_cli_makes_photo_clips_of_several_sizes(photos, tmp_path, vqa2):
    code, _, err = vqa2("synth", tmp_path / "out", "--images", photos, "--count", "6", "--seed", "4", "--size",
                        "96x64,64x64", "--fps", "8", "--seconds", "1", "--jobs", "1", "-q")
    assert code == 0, err
    manifest = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    sources = {row["source"].split(":")[0] for row in manifest}
    assert "photo" in sources and sources <= {"photo", "procedural"}
    assert {row["source"] for row in manifest if row["source"].startswith("photo:")} <= {"photo:a.png", "photo:sub/b.jpg"}
    sizes = {decode(tmp_path / "out" / row["video"]).shape[1:3] for row in manifest}
    assert sizes == {(64, 96), (64, 64)}
    assert json.loads((tmp_path / "out" / "synth.json").read_text())["images_dir"] == str(photos)
    assert {row["photo_scale"] for row in manifest} == {"0.00"}
    code, _, err = vqa2("synth", tmp_path / "scaled", "--images", photos, "--count", "4", "--seed", "4", "--size",
                        "96x64", "--fps", "8", "--seconds", "1", "--jobs", "1", "--photo-scale", "1,2", "-q")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "scaled" / "manifest.csv")))
    assert all(1 <= float(row["photo_scale"]) <= 2 for row in rows if row["source"].startswith("photo:"))
    code, _, err = vqa2("synth", tmp_path / "bad", "--images", photos, "--photo-scale", "0.5,2", "--count", "2")
    assert code == 2 and "--photo-scale must be 1 <= LO <= HI" in err


def test_photo_content_needs_images_and_images_exclude_clips(photos, tmp_path, vqa2):
    code, _, err = vqa2("synth", tmp_path / "a", "--content", "photo", "--count", "2")
    assert code == 2 and "photo content needs --images DIR" in err
    code, _, err = vqa2("synth", tmp_path / "b", "--images", photos, "--clips", photos, "--count", "2")
    assert code == 2 and "use --clips or --images, not both" in err
