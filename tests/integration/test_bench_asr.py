"""bench/asr.py: its word error rate is the textbook one, and a small run compares the three engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.asr import edit_distance, main, normalise, wer
from tests.conftest import DATASETS, RAVDESS


def test_normalise_drops_case_and_punctuation_but_keeps_apostrophes_in_words() -> None:
    assert normalise("Kids are talking, by the DOOR!") == ["kids", "are", "talking", "by", "the", "door"]
    assert normalise("The man's fall -- 'soft' cushion.") == ["the", "man's", "fall", "soft", "cushion"]
    assert normalise("well-known  ") == ["well", "known"]
    assert normalise("...") == []


@pytest.mark.parametrize(("ref", "hyp", "distance"), [
    ("a b c", "a b c", 0),
    ("a b c", "a x c", 1),  # one substitution
    ("a b c", "a c", 1),  # one deletion
    ("a b c", "a b c d", 1),  # one insertion
    ("a b c", "", 3),
    ("", "a b", 2),
    ("kids are talking by the door", "does it talk him by the door", 4),
    ("a b c d", "b c d a", 2),  # a shift is a deletion and an insertion
])
def test_edit_distance_counts_substitutions_deletions_insertions(ref: str, hyp: str, distance: int) -> None:
    assert edit_distance(ref.split(), hyp.split()) == distance


def test_wer_is_all_errors_over_all_reference_words() -> None:
    pairs = [("kids are talking by the door", "Kids are talking by the door."),  # 0 of 6
             ("dogs are sitting by the door", "dogs sitting by the floor now")]  # 1 del + 1 sub + 1 ins
    assert wer(pairs) == pytest.approx(3 / 12)
    assert wer([("one two", "one two three four")]) == pytest.approx(1.0)  # WER can pass 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the test speech")
@pytest.mark.skipif(not RAVDESS.is_dir(), reason=f"dataset folder absent: {RAVDESS}")
def test_a_small_run_compares_whisper_with_sphinx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pocketsphinx")
    pytest.importorskip("faster_whisper")
    # Base is left out to keep this quick (the engines share one code path, ser_ml.whisper_asr).
    main(["--data", str(DATASETS), "--sentences", "1", "--actors", "1", "--ravdess-limit", "2",
          "--engines", "whisper tiny.en,sphinx", "--json", str(tmp_path / "asr.json")])
    out = capsys.readouterr().out
    assert "| whisper tiny.en |" in out and "Ratio to Sphinx" in out
    summary = json.loads((tmp_path / "asr.json").read_text())["asr"]
    assert set(summary) == {"whisper tiny.en", "sphinx"}
    for engine in summary.values():
        assert engine["audio_s"]["ravdess"] > 5 and engine["rtf_clips_wall"] > 0
        assert all(0 <= w <= 2 for w in engine["wer"].values())
    # RAVDESS's two sentences (actor 1, neutral): Whisper hears them (nearly) word for word; Sphinx
    # has always mangled them.
    assert summary["whisper tiny.en"]["wer"]["ravdess"] <= 0.2
    assert summary["sphinx"]["wer"]["ravdess"] > summary["whisper tiny.en"]["wer"]["ravdess"]
