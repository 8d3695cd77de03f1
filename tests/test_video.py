"""Videos in records: dynamic frame-resolution sampling (pure), the timestamped clips a video becomes,
sources (files, frame folders, frame lists), and `vlrl data check` on bad videos."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from recipe import cli
from records import DataError, load_media, load_records, media_counts, write_records
from records.video import (VideoError, VideoSampling, expand_video_parts, parse_video, plan_frames,
                           split_clips, timestamp, verify)
from synth.video import write_video


def frames_at(fps: float, n: int) -> list[float]:
    return [i / fps for i in range(n)]


# ----------------------------------------------------------------------------- plan_frames (pure)

def test_one_frame_a_second_at_the_largest_level_that_fits():
    # 10 s at 30 fps, 640x360: ticks at 0..9 s; 640 -> 644x364 (multiples of 28): 23 * 13 = 299 tokens a
    # patch, 5 patches of 2 frames = 1495 tokens
    plan = plan_frames(frames_at(30, 300), 640, 360, VideoSampling())
    assert plan.indices == tuple(range(0, 300, 30)) and plan.times == tuple(float(i) for i in range(10))
    assert (plan.width, plan.height, plan.tokens) == (644, 364, 1495)


def test_the_ladder_steps_down_to_fit_the_budget():
    # 512 -> 504x280: 180 a patch, 900 > 600; 384 -> 392x224: 112 a patch, 560 <= 600
    plan = plan_frames(frames_at(30, 300), 640, 360, VideoSampling(token_budget=600))
    assert (plan.width, plan.height, plan.tokens, len(plan.indices)) == (392, 224, 560, 10)


def test_below_the_lowest_level_frames_are_dropped_uniformly():
    # 128 -> 140x84: 15 tokens a patch; a budget of 40 holds 2 patches = 4 frames, spread over the 10
    plan = plan_frames(frames_at(30, 300), 640, 360, VideoSampling(token_budget=40))
    assert plan.indices == (0, 90, 180, 270) and (plan.width, plan.height, plan.tokens) == (140, 84, 30)
    with pytest.raises(VideoError, match="cannot hold one temporal patch"):
        plan_frames(frames_at(30, 300), 640, 360, VideoSampling(token_budget=10))


@pytest.mark.parametrize("times, fps, expected", [
    (frames_at(1, 6), 2.0, (0, 1, 2, 3, 4, 5)),         # a video slower than fps keeps every frame
    (frames_at(2, 12), 2.0, tuple(range(12))),
    (frames_at(2, 12), 1.0, (0, 2, 4, 6, 8, 10)),
    (frames_at(10, 30), 5.0, tuple(range(0, 30, 2))),   # 5 fps for motion
    ([0.0, 0.4, 1.3, 1.9, 3.0], 1.0, (0, 1, 3, 4)),     # irregular: the frame on screen at each tick
])
def test_fps_ticks_take_the_frame_on_screen(times, fps, expected):
    assert plan_frames(times, 84, 84, VideoSampling(fps=fps)).indices == expected


def test_max_frames_and_no_upscaling():
    plan = plan_frames(frames_at(1, 100), 84, 84, VideoSampling(max_frames=16))
    assert len(plan.indices) == 16 and plan.indices[0] == 0 and plan.indices[-1] == 99
    assert (plan.width, plan.height) == (84, 84)         # never above the video's own size
    tiny = plan_frames(frames_at(2, 12), 84, 84, VideoSampling(fps=2, token_budget=40, resolutions=(84, 56)))
    assert (tiny.width, tiny.tokens) == (56, 24)         # 6 patches x 9 = 54 > 40; 56 -> 4 a patch


def test_timestamps_clips_and_expansion():
    assert timestamp(1.5) == "[1.5 second]" and timestamp(2) == "[2.0 second]"
    frames = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    clips = split_clips(frames, 2)
    assert [c.shape[0] for c in clips] == [2, 2, 2]
    assert np.array_equal(clips[2][0], frames[4]) and np.array_equal(clips[2][1], frames[4])   # padded
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": "A"}]
    out = expand_video_parts(messages, [[0.0, 1.5]])
    assert out[0]["content"] == [{"type": "text", "text": "[0.0 second]"}, {"type": "video"},
                                 {"type": "text", "text": "[1.5 second]"}, {"type": "video"},
                                 {"type": "image"}, {"type": "text", "text": "Q?"}]
    assert out[1] == messages[1] and messages[0]["content"][0] == {"type": "video"}   # input untouched
    with pytest.raises(ValueError, match="2 videos given but the messages hold 1"):
        expand_video_parts(messages, [[0.0], [1.0]])


@pytest.mark.parametrize("block, field, needle", [
    ("fast", "", "must be an object"),
    ({"fps": 0}, "fps", "positive number"),
    ({"fps": True}, "fps", "positive number"),
    ({"max_frames": 2.5}, "max_frames", "positive integer"),
    ({"token_budget": -1}, "token_budget", "positive integer"),
    ({"resolutions": []}, "resolutions", "non-empty list"),
    ({"resolutions": [84, "big"]}, "resolutions", "positive integer"),
    ({"speed": 2}, "speed", "unknown key"),
])
def test_bad_sampling_blocks(block, field, needle):
    with pytest.raises(VideoError, match=needle) as e:
        VideoSampling.from_json(block)
    assert e.value.field == field


def test_sampling_block_round_trips():
    cfg = VideoSampling.from_json({"fps": 2, "resolutions": [56, 84]})
    assert cfg == VideoSampling(fps=2.0, resolutions=(84, 56)) and VideoSampling.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("entry, field, needle", [
    (3, "", "must be a path or an object"),
    ("", "", "non-empty path"),
    ({"path": "a.mov", "frames": ["a.png"]}, "", "exactly one of path"),
    ({"frames": ["a.png"]}, "frames", "need fps or times"),
    ({"frames": [], "fps": 1}, "frames", "non-empty list"),
    ({"frames": ["a.png"], "times": [0], "fps": 1}, "times", "not both"),
    ({"frames": ["a.png", "b.png"], "times": [1, 0]}, "times", "must increase"),
    ({"path": "a.mov", "num_frames": 0}, "num_frames", "positive integer"),
    ({"path": "a.mov", "loop": True}, "loop", "unknown key"),
])
def test_bad_video_entries(tmp_path, entry, field, needle):
    with pytest.raises(VideoError, match=needle) as e:
        parse_video(entry, tmp_path)
    assert e.value.field == field


# ----------------------------------------------------------------------------- sources

@pytest.fixture(scope="module")
def clip_frames():
    """8 frames of 84x84 at 2 fps: a red square in frames 2-4, a blue one from frame 5."""
    frames = np.zeros((8, 84, 84, 3), dtype=np.uint8)
    frames[2:5, 10:30, 10:30] = (230, 40, 40)
    frames[5:, 40:60, 40:60] = (50, 90, 240)
    return frames


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, clip_frames):
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "clip.mov", clip_frames, 2)
    data = (d / "clip.mov").read_bytes()
    (d / "cut.mov").write_bytes(data[:len(data) // 2])                 # index first: it opens, frames missing
    (d / "stub.mov").write_bytes(data[:200])                           # the index itself cut
    (d / "frames").mkdir()
    for i, f in enumerate(clip_frames):
        Image.fromarray(f).save(d / "frames" / f"{i:03d}.png")
    Image.new("RGB", (84, 84)).save(d / "img.png")
    return d


def test_a_file_a_folder_and_a_frame_list_give_the_same_video(video_dir, clip_frames):
    sources = [parse_video("clip.mov", video_dir), parse_video({"path": "frames", "fps": 2}, video_dir),
               parse_video({"frames": [f"frames/{i:03d}.png" for i in range(8)],
                            "times": [i / 2 for i in range(8)]}, video_dir)]
    for src in sources:
        info = verify(src)
        assert info.times == tuple(i / 2 for i in range(8)) and (info.width, info.height) == (84, 84)


def test_load_media_samples_and_expands(video_dir, clip_frames):
    rec = {"id": "v", "task": "video_temporal", "videos": ["clip.mov"], "images": ["img.png"],
           "video": {"fps": 1, "resolutions": [84]},
           "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                     {"type": "text", "text": "When?"}]}], "answer": "[1.0, 2.5]"}
    (video_dir / "v.jsonl").write_text(json.dumps(rec) + "\n")
    (r,) = load_records(video_dir / "v.jsonl")
    media = load_media(r)
    # 1 fps of a 2 fps video: frames 0, 2, 4, 6 -> two clips, at 0 s and 2 s
    assert [p.get("text") for p in media.messages[0]["content"]] == ["[0.0 second]", None, "[2.0 second]", None,
                                                                     None, "When?"]
    assert len(media.videos) == 2 and len(media.images) == 1 and media_counts(r) == (1, 2)
    assert np.array_equal(np.concatenate(media.videos), clip_frames[[0, 2, 4, 6]])   # lossless, exact
    out = video_dir / "copy" / "v.jsonl"
    write_records(out, [r])
    (again,) = load_records(out)
    assert again.videos == r.videos and again.video == r.video


@pytest.mark.parametrize("entry, needle", [
    ("cut.mov", "header lists 8 frames but [0-7] are present"),
    ("stub.mov", "cannot decode video stub.mov"),
    ("nope.mov", "video file not found"),
    ("frames", "is a folder: a folder of frames needs fps or times"),
    ({"path": "clip.mov", "num_frames": 10}, "the record says 10 frames, the video has 8"),
    ({"path": "frames", "times": [0, 1, 2]}, "3 times for 8 frames"),
    ({"frames": ["frames/000.png", "frames/009.png"], "fps": 1}, "frame file not found"),
])
def test_bad_videos(video_dir, entry, needle):
    with pytest.raises(VideoError, match=needle):
        verify(parse_video(entry, video_dir))


# ----------------------------------------------------------------------------- records and `vlrl data check`

def _record(video, rid="a", parts=1):
    return {"id": rid, "task": "video_count", "videos": [video] if video is not None else [], "answer": "1",
            "messages": [{"role": "user", "content": [{"type": "video"}] * parts + [{"type": "text", "text": "How?"}]}]}


def test_cli_check_exits_2_on_a_truncated_video(video_dir):
    f = video_dir / "check.jsonl"
    f.write_text(json.dumps(_record("clip.mov")) + "\n" + json.dumps(_record("cut.mov", rid="b")) + "\n")
    r = subprocess.run([sys.executable, "-m", "recipe.cli", "data", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{f}:2: videos[0]: cut.mov: its header lists 8 frames but" in r.stderr
    assert "(a truncated or damaged file)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad, field, needle", [
    ("stub.mov", "videos[0]", "cannot decode video stub.mov"),
    ({"path": "clip.mov", "num_frames": 12}, "videos[0].num_frames", "the record says 12 frames, the video has 8"),
    ({"frames": ["frames/000.png", "frames/001.png", "frames/002.png"], "times": [0, 1]}, "videos[0].times",
     "2 times for 3 frames"),
    ({"path": "frames", "fps": 2, "num_frames": 7}, "videos[0].num_frames", "the record says 7 frames, the video has 8"),
])
def test_cli_check_names_file_line_and_field_of_a_bad_video(video_dir, capsys, bad, field, needle):
    f = video_dir / "check.jsonl"
    f.write_text(json.dumps(_record("clip.mov")) + "\n" + json.dumps(_record(bad, rid="b")) + "\n")
    assert cli.main(["data", "check", str(f)]) == 2
    assert f"{f}:2: {field}: {needle}" in capsys.readouterr().err
    f.write_text(json.dumps(_record("clip.mov")) + "\n" + json.dumps(_record({"path": "frames", "fps": 2}, "b")) + "\n")
    assert cli.main(["data", "check", str(f)]) == 0
    assert "2 records ok (video_count 2)" in capsys.readouterr().out


def test_video_counts_must_agree(video_dir):
    f = video_dir / "counts.jsonl"
    f.write_text(json.dumps(_record("clip.mov", parts=2)) + "\n")
    with pytest.raises(DataError, match=r"counts.jsonl:1: videos: 1 video\(s\) listed but the messages hold 2"):
        load_records(f)
    f.write_text(json.dumps({**_record("clip.mov"), "video": {"fps": -1}}) + "\n")
    with pytest.raises(DataError, match=r"counts.jsonl:1: video.fps: must be a positive number"):
        load_records(f)
