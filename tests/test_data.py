import json
import os

import pytest

from tests.fixtures.clips import make_clip
from vqa2cli.data import (
    SCORE_QUESTION,
    find_data_file,
    format_problems,
    CsvRow,
    Problem,
    load_dataset,
    read_csv,
    resolve_video_path,
)
from vqa2cli.errors import DataError
from vqa2cli.scoring import mos_to_level


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    path = make_clip(tmp_path_factory.mktemp("clip") / "c.mp4", size=(64, 64), frames=8, fps=8)
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path, clip_bytes):
    """A data folder with two good clips, one broken file, and an outside clip."""
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.mp4").write_bytes(clip_bytes)
    (tmp_path / "data" / "sub" / "b.mp4").write_bytes(clip_bytes)
    (tmp_path / "data" / "broken.mp4").write_bytes(b"not a video at all" * 10)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "data" / "photo.png")
    (tmp_path / "outside.mp4").write_bytes(clip_bytes)
    return tmp_path / "data"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_stage1_csv_builds_questions_and_answers(folder):
    write(folder / "d.csv", "video,distortion,kind\na.mp4,blur,spatial\nsub/b.mp4,Stuttering.,motion\na.mp4,noise,\n")
    data = load_dataset(folder, stage=1)
    assert data.problems == [] and data.total == 3
    first, second, third = data.records
    assert first.turns == [("human", "What is the main spatial distortion in this video?"), ("gpt", "It is blur.")]
    assert second.turns[1] == ("gpt", "It is Stuttering.") and second.kind == "motion"
    assert third.kind == "spatial"  # no kind: spatial
    assert first.video == (folder / "a.mp4").resolve() and first.wrapped
    assert first.where == "d.csv line 2"


def test_stage2_csv_maps_mos_to_levels(folder):
    write(folder / "d.csv", "video,mos\na.mp4,1\na.mp4,2.9\na.mp4,3.0\na.mp4,4.1\na.mp4,5\n")
    data = load_dataset(folder / "d.csv", stage=2, mos_range=(1, 5))
    answers = [record.turns[1][1] for record in data.records]
    assert answers == [f"The quality of this video is {level}." for level in ("low", "fair", "fair", "good", "high")]
    assert data.records[0].turns[0] == ("human", SCORE_QUESTION) and not data.records[0].wrapped
    assert [mos_to_level(m, (0, 100)) for m in (0, 19.9, 20, 59.9, 60, 80, 100)] == \
        ["low", "low", "poor", "fair", "good", "high", "high"]


def test_stage2_csv_needs_mos_range(folder):
    write(folder / "d.csv", "video,mos\na.mp4,3\n")
    with pytest.raises(DataError, match="--mos-range"):
        load_dataset(folder, stage=2)


def test_invalid_csv_records_are_reported_with_line_numbers(folder):
    write(folder / "d.csv",
          'video,question,answer\n'
          'a.mp4,"a question\nover two lines",yes\n'   # lines 2-3
          'missing.mp4,q,a\n'                           # line 4
          '\n'                                          # line 5: blank, skipped
          'broken.mp4,q,a\n'                            # line 6
          'a.mp4,,a\n'                                  # line 7
          'a.mp4,q\n'                                   # line 8
          '../outside.mp4,q,a\n'                        # line 9
          'sub/b.mp4,q,a\n'                             # line 10
          'photo.png,q,a\n')                            # line 11
    data = load_dataset(folder, stage=3)
    assert [r.where for r in data.records] == ["d.csv line 2", "d.csv line 10"]
    assert data.records[0].turns[0] == ("human", "a question\nover two lines")
    assert [p.where for p in data.problems] == [f"d.csv line {n}" for n in (4, 6, 7, 8, 9, 11)]
    messages = [p.message for p in data.problems]
    assert "missing.mp4': file not found" in messages[0]
    assert "broken.mp4': not a video file" in messages[1]
    assert messages[2] == "empty question"
    assert messages[3] == "2 fields, the header has 3"
    assert "leaves the data folder" in messages[4]
    assert messages[5] == "video 'photo.png': a still image (png), not a video"
    report = format_problems(data, limit=2)
    assert report[0] == "d.csv: 6 of 8 records are invalid:"
    assert report[1].startswith("  d.csv line 4:") and report[-1] == "  ... and 4 more"


def test_the_csv_reader_and_its_error_policy(tmp_path):
    """The one reader of fine-tuning CSVs and eval label files: file-level problems are DataErrors, row
    problems are Problems with the line the row starts on; `path` or `video` names the video."""
    (tmp_path / "sub").mkdir()
    file = tmp_path / "t.csv"
    file.write_bytes("\ufeffPath , Note\nsub/a.mp4,ok\n\n\"b.mp4\",\"two\nlines\"\nc.mp4\n../x.mp4,up\n/x.mp4,abs\n"
                     .encode("utf-8"))
    header, rows = read_csv(file, lambda columns: columns, video_columns=("video", "path"))
    assert header == ["path", "note"]  # stripped, lower-cased, byte-order mark dropped
    root = tmp_path.resolve()
    assert rows[:2] == [CsvRow("t.csv line 2", {"path": "sub/a.mp4", "note": "ok"}, "sub/a.mp4", root / "sub/a.mp4"),
                        CsvRow("t.csv line 4", {"path": "b.mp4", "note": "two\nlines"}, "b.mp4", root / "b.mp4")]
    assert rows[2] == Problem("t.csv line 6", "1 fields, the header has 2")
    assert rows[3].where == "t.csv line 7" and "leaves the data folder" in rows[3].message
    assert rows[4].where == "t.csv line 8" and "is absolute" in rows[4].message

    def refuse(columns):
        raise DataError(f"{file}: no")

    with pytest.raises(DataError, match="t.csv: no"):
        read_csv(file, refuse)
    with pytest.raises(DataError, match="names no video column"):
        read_csv(file, lambda columns: None, video_columns=("video",))
    for content, reason in ((b"", "empty file"), (b"video\n\xff\xfe.mp4\n", "not UTF-8"),
                            (b'video\n"' + b"a" * 200_000 + b'"\n', "malformed CSV")):
        file.write_bytes(content)
        with pytest.raises(DataError, match=reason):
            read_csv(file, lambda columns: None)


def test_wrong_columns_for_the_stage(folder):
    write(folder / "d.csv", "video,mos\na.mp4,3\n")
    with pytest.raises(DataError, match="header lacks question, answer; stage 3 expects video,question,answer"):
        load_dataset(folder, stage=3)


def test_release_json_with_array_index_and_line(folder):
    human = "The key frames of this video are:\n<image>. And the motion feature of the video is\n<image>. Rate it."
    records = [
        {"id": "x", "image": "a.mp4", "frames per sec": 1, "gt_score": 3.2,
         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "Good."}]},
        {"id": "y", "image": "a.mp4",
         "conversations": [{"from": "gpt", "value": "Good."}, {"from": "human", "value": "q"}]},
        {"id": "z", "video": "sub/b.mp4", "conversations": [
            {"role": "user", "content": "What is the main motion distortion?"},
            {"role": "assistant", "content": "Judder."},
            {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Nothing else."}]},
        {"id": "w", "image": "a.mp4", "conversations": [{"from": "human", "value": "<image><image><image>"},
                                                         {"from": "gpt", "value": "x"}]},
        {"id": "v", "image": ["a.mp4", "a.mp4"], "conversations": []},
    ]
    text = json.dumps(records, indent=2)
    write(folder / "d.json", text)
    line_of_z = text.splitlines().index('    "id": "z",')  # 0-based index of the line after the opening brace
    data = load_dataset(folder, stage=1)
    assert [r.where for r in data.records] == ["d.json [0] (line 2)", f"d.json [2] (line {line_of_z})"]
    assert not data.records[0].wrapped and data.records[1].wrapped
    assert data.records[1].kind == "motion" and data.records[0].kind is None
    assert len(data.records[1].turns) == 4
    assert [p.where.split(" (")[0] for p in data.problems] == ["d.json [1]", "d.json [3]", "d.json [4]"]
    assert "turn 0 must be from human" in data.problems[0].message
    assert "holds 3 <image> slots; at most 2" in data.problems[1].message
    assert "lists of images are not supported" in data.problems[2].message


def test_jsonl_reports_lines_including_bad_json(folder):
    good = {"image": "a.mp4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    absolute = json.dumps({**good, "image": "/etc/passwd"})
    write(folder / "d.jsonl", json.dumps(good) + "\n\n{not json\n" + absolute + "\n")
    data = load_dataset(folder, stage=3)
    assert [r.where for r in data.records] == ["d.jsonl line 1"]
    assert [p.where for p in data.problems] == ["d.jsonl line 3", "d.jsonl line 4"]
    assert "not valid JSON" in data.problems[0].message
    assert "is absolute" in data.problems[1].message


def test_broken_json_file_is_a_data_error(folder):
    write(folder / "d.json", '[{"image": "a.mp4"},\n {"image": ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset(folder, stage=3)


def test_paths_may_not_escape_the_data_folder(folder, tmp_path):
    root = folder.resolve()
    assert resolve_video_path(root, "sub/../a.mp4") == root / "a.mp4"
    for bad, reason in [("/abs/x.mp4", "absolute"), ("../outside.mp4", "leaves"), ("sub/../../x", "leaves"),
                        ("C:\\x.mp4", "absolute"), ("", "empty")]:
        with pytest.raises(ValueError, match=reason):
            resolve_video_path(root, bad)
    os.symlink(tmp_path / "outside.mp4", folder / "link.mp4")
    os.symlink(folder / "a.mp4", folder / "inner.mp4")
    with pytest.raises(ValueError, match="symbolic link"):
        resolve_video_path(root, "link.mp4")
    assert resolve_video_path(root, "inner.mp4") == root / "a.mp4"
    write(folder / "d.csv", "video,distortion\nlink.mp4,blur\ninner.mp4,blur\n")
    data = load_dataset(folder, stage=1)
    assert len(data.records) == 1 and "symbolic link" in data.problems[0].message


def test_data_folder_must_hold_one_data_file(folder):
    with pytest.raises(DataError, match="no .json, .jsonl or .csv"):
        find_data_file(folder)
    write(folder / "a.csv", "video,mos\n")
    assert find_data_file(folder) == folder / "a.csv"
    write(folder / "b.jsonl", "")
    with pytest.raises(DataError, match=r"several data files \(a.csv, b.jsonl\)"):
        find_data_file(folder)
    with pytest.raises(DataError, match="no such file"):
        find_data_file(folder / "nope.csv")


def test_json_array_places_on_a_multi_line_file(folder):
    turns = '"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]'
    text = (
        "\ufeff[\n"                                       # line 1 (a byte-order mark is allowed)
        f'  {{"image": "a.mp4", {turns}}},\n'             # line 2: [0]
        "\n"                                              # line 3
        f'  {{"image": "a.mp4",\n   {turns}}}, {{"image": "nope.mp4", {turns}}},\n'  # lines 4-5: [1]; [2] on 5
        "  [1, 2],\n"                                     # line 6: [3], not an object
        f'  {{\n\n\n "image": "/abs.mp4", {turns}}}\n'    # lines 7-10: [4]
        "]\n"
    )
    write(folder / "d.json", text)
    data = load_dataset(folder, stage=3)
    assert [r.where for r in data.records] == ["d.json [0] (line 2)", "d.json [1] (line 4)"]
    assert [str(p) for p in data.problems] == [
        "d.json [2] (line 5): video 'nope.mp4': file not found",
        "d.json [3] (line 6): a record must be a JSON object",
        "d.json [4] (line 7): video path '/abs.mp4' is absolute; paths must be relative to the data folder",
    ]
    write(folder / "d.json", text.replace("},\n  [1, 2]", "}\n  [1, 2]"))  # a comma missing at the end of line 5
    with pytest.raises(DataError, match=r"d.json: not valid JSON \(expected ',' or '\]' at line 6\)$"):
        load_dataset(folder, stage=3)


def test_json_nested_too_deep_is_a_one_line_data_error(folder):
    deep = "[" * 100_000 + "]" * 100_000
    write(folder / "d.json", f"[{deep}]")
    with pytest.raises(DataError, match=r"d.json: record \[0\] \(line 1\) is nested too deeply to be read$"):
        load_dataset(folder, stage=3)
    (folder / "d.json").unlink()
    write(folder / "d.jsonl", deep + "\n")
    data = load_dataset(folder, stage=3)
    assert [str(p) for p in data.problems] == ["d.jsonl line 1: not valid JSON (JSON nested too deeply)"]


def test_big_json_files_say_what_happens_and_huge_ones_are_refused(folder, monkeypatch):
    import vqa2cli.data as data_module

    write(folder / "d.json", "[]")
    said = []
    monkeypatch.setattr(data_module, "BIG_FILE_BYTES", 2)
    load_dataset(folder / "d.json", stage=3, say=said.append)
    assert said == ["reading d.json (0 MiB)", "read 0 records; checking them and their videos"]
    monkeypatch.setattr(data_module, "MAX_JSON_BYTES", 1)
    with pytest.raises(DataError, match="JSON data files are read whole and may be at most"):
        load_dataset(folder / "d.json", stage=3)


def test_a_folder_made_by_synth_gives_each_stage_its_own_file(folder):
    for name in ("synth.json", "manifest.csv", "labels.csv", "stage1.csv", "stage1.json", "stage3.csv"):
        write(folder / name, "")
    said = []
    assert find_data_file(folder, stage=1) == folder / "stage1.json"  # JSON first: no --mos-range needed
    assert find_data_file(folder, stage=3) == folder / "stage3.csv"
    with pytest.raises(DataError, match=r"several data files \(stage1.csv, stage1.json, stage3.csv\)"):
        find_data_file(folder, stage=2)  # the files that are not training data are never named
    write(folder / "stage1.json", "[]")
    load_dataset(folder, stage=1, say=said.append)
    assert said == [f"using stage1.json from {folder}"]
    for name in ("stage1.csv", "stage1.json", "stage3.csv"):
        (folder / name).unlink()
    with pytest.raises(DataError, match="no .json, .jsonl or .csv data file in this folder"):
        find_data_file(folder, stage=1)
