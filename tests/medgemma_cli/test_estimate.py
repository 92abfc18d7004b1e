"""Saying the wait before the work (model-free, then once with the tiny model): speeds remembered from earlier
runs, the estimate's arithmetic and wording, and the estimate said before the first image is encoded."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.estimate import Speeds, duration, estimate, known_speeds, remember


def test_the_estimate_adds_images_and_reading_and_suggests_fewer_slices():
    e = estimate(Speeds(encode_s_per_image=20.0, prompt_tokens_per_s=40.0), images=85, prompt_tokens=22_000,
                 image_tokens=256, slices=85)
    assert e.images_s == 1700 and e.reading_s == 550 and e.total_s == 2250
    assert e.fewer_slices == 24
    assert e.fewer_slices_s == pytest.approx(2250 - 61 * (20 + 256 / 40))  # 61 slices fewer to encode and read
    line = e.line()
    assert line.startswith("85 slices: about 38 min on this machine (images 28 min, reading 9 min)")
    assert line.endswith("; --max-slices 24 takes about 11 min")
    short = estimate(Speeds(2.0, 100.0), images=1, prompt_tokens=300, image_tokens=256)
    assert short.line() == "1 image: about 5 s on this machine (images 2 s, reading 3 s)"


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0.2, 42, 89, 95, 3000, 5400, 9000)] == [
        "1 s", "42 s", "89 s", "2 min", "50 min", "1.5 h", "2.5 h"]


def test_speeds_are_remembered_and_blended(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path))
    assert known_speeds("m") is None
    remember("m", images=4, encode_s=40.0, prompt_tokens=1000, reading_s=10.0)
    assert known_speeds("m") == Speeds(10.0, 100.0)
    remember("m", images=2, encode_s=40.0, prompt_tokens=1000, reading_s=5.0)  # half old, half new
    assert known_speeds("m") == Speeds(15.0, 150.0)
    remember("m", images=0, encode_s=0.0, prompt_tokens=10, reading_s=0.1)  # too small to measure: unchanged
    assert known_speeds("m") == Speeds(15.0, 150.0)
    (tmp_path / "cache" / "speeds.json").write_text("{not json")
    assert known_speeds("m") is None  # a damaged file: no estimate, no error


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def planned(self, estimate, images: int) -> None:
        self.events.append(("planned", estimate, images))

    def image(self, done: int, total: int) -> None:
        self.events.append(("image", done, total))


@pytest.mark.slow
def test_the_estimate_comes_before_the_first_image(convert_tiny, tmp_path, monkeypatch):
    from medgemma_cli.answering import AskOptions, ask

    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path))
    emri = Path(get_testdata_file("emri_small.dcm", download=False))
    model = convert_tiny("Q8_0")
    first = Recorder()
    r = ask("Describe.", [emri], model=model, options=AskOptions(max_tokens=2, cache=False), progress=first)
    assert first.events[0] == ("planned", None, 10) and r.estimate is None  # nothing measured before
    assert [e[1] for e in first.events[1:]] == list(range(1, 11))
    second = Recorder()
    r = ask("Describe.", [emri], model=model, options=AskOptions(max_tokens=2, cache=False), progress=second)
    kind, said, images = second.events[0]
    assert kind == "planned" and images == 10 and said is not None and said.images == 10
    assert second.events[1][0] == "image"
    assert r.estimate is not None and r.estimate["images"] == 10 and r.estimate["images_s"] > 0  # total_s is rounded


@pytest.mark.slow
def test_a_batch_says_its_wait_from_the_speeds_its_worker_measured(convert_tiny, tmp_path, monkeypatch):
    import shutil

    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import run_batch

    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path / "home"))
    folder = tmp_path / "cine"
    folder.mkdir()
    shutil.copy(get_testdata_file("emri_small.dcm", download=False), folder / "a.dcm")
    model = convert_tiny("Q8_0")
    said: list = []
    opts = AskOptions(max_tokens=2, cache=False)
    run_batch(folder, ["Q?"], tmp_path / "r1.jsonl", model=model, options=opts, on_wait=said.append)
    assert said == []  # the first run on this machine has nothing to go by
    run_batch(folder, ["Q?"], tmp_path / "r2.jsonl", model=model, options=opts, on_wait=said.append)
    assert len(said) == 1 and said[0].images == 10 and said[0].total_s > 0
