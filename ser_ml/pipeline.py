"""The analysis of a chunk of recordings: decode → speech check (Silero VAD) → speech clips →
Whisper encoder (batched across the chunk) → one RF pipeline call → batched LSTM.

A recording of several channels may be a conversation with one speaker per channel
(``ser_ml.channels``): each channel is then a *lane* of its own (its speech segments, clips, speech
check and predictions) and the outcome carries one result per channel plus the conversation
(``ser_ml.conversation``). A mono or mixed recording is one lane. The clips of every lane of every
recording in the chunk still go through the encoder and the models together.

Pure of database concerns: it takes job inputs and returns outcomes; ``worker.results`` persists them.
The transcripts come after, once the emotions are stored: ``ser_ml.transcript_stage``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ser_ml import channels, conversation, vad
from ser_ml.features import SAMPLE_RATE, SILENCE_DBFS, Features
from ser_ml.inference import Ensemble, Prediction
from ser_ml.segments import FRAME_S, WHOLE_UP_TO_S, EnergyMeter, Segment, find_segments, frame_energy_db
from ser_ml.speech_detector import SURE_SPEECH_S
from ser_ml.speech_features import speech_clip
from ser_ml.time_limit import TimeLimit
from ser_shared import schemas
from ser_shared.audio import check_duration, decode, decode_channels, probe, stream, stream_channels
from ser_shared.errors import AudioError, IncompleteAudio, NoSpeech, SilentAudio, TooManyChannels
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

# Longer recordings are decoded as a stream, in two passes, so memory does not grow with length.
STREAM_OVER_S = 60.0
# A recording of which less than this share of the header's length decodes is refused as truncated.
DECODED_SHARE = 0.5
# ``extract`` calls a recording silent from its peak, which a DC offset lifts (a cheap converter's
# silence, a constant float export): one whose signal never varies by more than the silence floor
# is silent too, and would otherwise get a confident-looking emotion for a flat line.
SILENT_SPAN = 2 * 10 ** (SILENCE_DBFS / 20)
# Segments of a streamed recording go through the models this many at a time, as they are cut, so
# only their probabilities are kept: memory does not grow with the recording's length.
STREAM_BATCH = 16
NO_SPEECH_MESSAGE = ("no speech was found in the recording (noise, tones, music or other sounds only): "
                     "there is no emotion to report")


@dataclass(frozen=True)
class JobInput:
    id: uuid.UUID
    path: Path
    format: str
    transcribe: str | None = None  # "google" | "sphinx" when a transcript was asked for
    language: str = "en-US"
    duration_s: float | None = None  # from the upload's header probe, when it told
    key: str | None = None  # the storage key ``path`` was made from (the worker spools it, see worker.spool)
    channels: str = "auto"  # "auto" | "mix" | "split": how several channels are analysed (ser_ml.channels)
    channel_labels: Sequence[str] | None = None  # a label per channel; ch0, ch1, ... where none is given
    channel_count: int | None = None  # from the upload's header probe, when it told


@dataclass
class Outcome:
    job_id: uuid.UUID
    prediction: Prediction | None = None
    error_code: str | None = None
    error_message: str | None = None
    duration_s: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Transcript stage: "pending" until ``transcript_stage.transcribe_all`` fills it; the decoded audio is kept only
    # for recordings that asked for one, and dropped once transcribed: mono (samples,), or
    # (channels, samples) for a recording analysed channel by channel.
    transcript: dict[str, Any] | None = None
    audio: np.ndarray | None = field(default=None, repr=False)
    # Speech segments with their own predictions (one covering the whole of a short recording);
    # a split recording's are all its channels' in time order.
    segments: list[dict[str, Any]] | None = None
    # How it was analysed ("mono", "mix" or "split", as ``schemas.Conversation.channels``), one
    # ``schemas.Channel`` per speaker (the segment dicts are the same objects as in ``segments``),
    # and the ``schemas.Conversation``.
    mode: str = "mono"
    labels: list[str] = field(default_factory=lambda: ["ch0"])
    channels: list[dict[str, Any]] | None = None
    conversation: dict[str, Any] | None = None


@dataclass
class Lane:
    """One speaker's part of a recording (a channel of a split one, or the whole recording): the
    clips still to encode (batched with the rest of the chunk) or, for a streamed recording, each
    model's probabilities already."""

    index: int
    label: str
    clips: list[np.ndarray] = field(default_factory=list)
    spans: list[Segment] = field(default_factory=list)
    probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # Silero's longest speech region: under SURE_SPEECH_S the speech detector, fed the encoder's
    # vectors of this lane, decides whether it holds speech at all (see ser_ml.speech_detector).
    silero_longest_s: float = float("inf")


@dataclass
class Prepared:
    """A decoded recording's lanes, ready for the models."""

    outcome: Outcome
    lanes: list[Lane] = field(default_factory=list)

    @property
    def clips(self) -> list[np.ndarray]:
        return [clip for lane in self.lanes for clip in lane.clips]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


Progress = Callable[[uuid.UUID, float], None]  # (job id, share done 0..1) while a long recording runs


def prepare(job: JobInput, settings: Settings, ensemble: Ensemble,
            on_progress: Progress | None = None) -> Prepared:
    """Decode, check for speech and segment one recording; an AudioError becomes a failed outcome.

    ``ensemble`` is used only by streamed recordings, whose segments are analysed as they are cut.
    A mono recording, or one whose channels are mixed on request, takes the mono decoder alone.
    """
    prepared = Prepared(Outcome(job.id))
    outcome = prepared.outcome
    try:
        if not job.path.exists():
            # The decoders report a missing file as undecodable data (decode_failed): say it is gone.
            raise FileNotFoundError(job.path)
        long, count = _layout(job, settings)
        _set_mode(outcome, job, "mono" if (count or 1) == 1 else "mix", count or 1)
        apart = count is not None and count > 1 and job.channels != "mix"  # channels may be speakers
        if long and apart and count:
            _prepare_streamed_channels(job, settings, ensemble, prepared, count, on_progress)
        elif long:
            _prepare_streamed(job, settings, ensemble, prepared, on_progress)
        else:
            started = time.perf_counter()
            if apart and count:
                audio = decode_channels(job.path, job.format, SAMPLE_RATE, settings.max_duration_s, count)
                outcome.timings_ms["decode"] = _ms(started)
                _prepare_channels(job, settings, prepared, audio)
            else:
                audio = decode(job.path, job.format, SAMPLE_RATE, settings.max_duration_s)
                outcome.timings_ms["decode"] = _ms(started)
                _prepare_whole(job, settings, prepared, audio)
    except AudioError as exc:
        outcome.error_code, outcome.error_message = exc.code, exc.message
    except FileNotFoundError:
        outcome.error_code, outcome.error_message = "audio_missing", "the stored recording is gone"
    except TimeLimit:
        raise  # the task ran out of time, not this recording: analyze fails the chunk time_limit_exceeded
    except Exception:
        # A bug or an input we did not foresee: fail this recording alone, keep the traceback.
        log.exception("analysis failed job_id=%s", job.id)
        outcome.error_code, outcome.error_message = "internal_error", "unexpected error while analysing"
    if outcome.error_code:
        prepared.lanes = []
        outcome.audio = outcome.transcript = None
    return prepared


def _set_mode(outcome: Outcome, job: JobInput, mode: str, count: int) -> None:
    """Record how the recording is analysed, with a label per lane (one unless split)."""
    outcome.mode = mode
    outcome.labels = channels.labels(count if mode == "split" else 1, job.channel_labels)


def _pending_transcript(job: JobInput, outcome: Outcome, audio: np.ndarray) -> None:
    if job.transcribe:
        outcome.audio = audio
        outcome.transcript = {"status": "pending", "engine": job.transcribe, "language": job.language}


def _prepare_whole(job: JobInput, settings: Settings, prepared: Prepared, audio: np.ndarray) -> None:
    """The recording as one lane (mono, or its channels mixed)."""
    outcome = prepared.outcome
    lane = Lane(0, outcome.labels[0])
    prepared.lanes = [lane]
    outcome.duration_s = round(audio.size / SAMPLE_RATE, 3)
    _check_complete(job.duration_s, outcome.duration_s)
    check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
    _check_varies(float(audio.min()), float(audio.max()))
    started = time.perf_counter()
    probs = vad.speech_probabilities(audio)
    lane.silero_longest_s = vad.longest_region_s(audio, probabilities=probs)
    outcome.timings_ms["vad"] = _ms(started)
    started = time.perf_counter()
    # Up to WHOLE_UP_TO_S a recording is one utterance; longer ones are cut where the trained
    # detector hears pauses, so noise between utterances is not analysed as speech. Where
    # Silero heard (almost) nothing, the energy segments go to the speech detector instead.
    sure = lane.silero_longest_s >= SURE_SPEECH_S
    spans = vad.speech_segments(audio, probabilities=probs) if sure and outcome.duration_s > WHOLE_UP_TO_S \
        else find_segments(audio)
    for span in spans:
        try:
            lane.clips.append(speech_clip(audio[int(span.start * SAMPLE_RATE) : int(span.end * SAMPLE_RATE)]))
            lane.spans.append(span)
        except SilentAudio:
            if len(spans) == 1:
                raise
    if not lane.clips:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["features"] = _ms(started)  # segments and speech clips; the encoder is inference
    _pending_transcript(job, outcome, audio)


def _prepare_channels(job: JobInput, settings: Settings, prepared: Prepared, audio: np.ndarray) -> None:
    """A multi-channel recording, (channels, samples): mixed to one lane, or a lane per channel."""
    outcome = prepared.outcome
    outcome.duration_s = round(audio.shape[1] / SAMPLE_RATE, 3)
    _check_complete(job.duration_s, outcome.duration_s)
    check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
    _check_varies(float(audio.min()), float(audio.max()))
    started = time.perf_counter()
    energies = np.stack([frame_energy_db(row) for row in audio])
    if _split_or_mix(job, energies) == "mix":
        _set_mode(outcome, job, "mix", audio.shape[0])
        _prepare_whole(job, settings, prepared, channels.mix(audio))
        return
    _set_mode(outcome, job, "split", audio.shape[0])
    probs = [vad.speech_probabilities(row) for row in audio]
    own = _own_speech(energies, probs)
    outcome.timings_ms["vad"] = _ms(started)
    started = time.perf_counter()
    prepared.lanes = [_lane(i, label, audio[i], probs[i], energies[i], own[i])
                      for i, label in enumerate(outcome.labels)]
    if not prepared.clips:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["features"] = _ms(started)
    _pending_transcript(job, outcome, audio)


def _lane(index: int, label: str, audio: np.ndarray, probabilities: np.ndarray, energy: np.ndarray,
          own: np.ndarray) -> Lane:
    """One channel of a split recording: its own speech's segments (crosstalk left out) and clips."""
    heard = vad.frame_flags(probabilities, energy.size) & own
    lane = Lane(index, label, silero_longest_s=_longest_run_s(heard))
    for span in vad.segments_from_probabilities(probabilities, energy, audio.size / SAMPLE_RATE, keep=own):
        try:
            lane.clips.append(speech_clip(audio[int(span.start * SAMPLE_RATE) : int(span.end * SAMPLE_RATE)]))
            lane.spans.append(span)
        except SilentAudio:
            pass  # a segment of near-silence says nothing: leave it out
    return lane


def _split_or_mix(job: JobInput, energies: np.ndarray) -> str:
    """``split`` or ``mix`` for a multi-channel recording: as asked, or as ``channels.decide`` finds.
    Raises TooManyChannels when a split is asked of more channels than ``channels.MAX_SPEAKERS``."""
    if job.channels == "split":
        if energies.shape[0] > channels.MAX_SPEAKERS:
            raise TooManyChannels(f"{energies.shape[0]} channels cannot be analysed as speakers (at most "
                                  f"{channels.MAX_SPEAKERS}); ask for channels=mix")
        return "split"
    decision = channels.decide(energies)
    log.info("channels job_id=%s mode=%s offsets_db=%s spreads_db=%s", job.id, decision.mode,
             decision.offsets_db, decision.spreads_db)
    return decision.mode


def _own_speech(energies: np.ndarray, probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Per channel and 10 ms frame: speech of that channel's own speaker may be there (not crosstalk)."""
    heard = np.stack([vad.frame_flags(p, energies.shape[1]) for p in probabilities])
    return channels.own_speech(energies, heard)


def _longest_run_s(flags: np.ndarray) -> float:
    """The longest run of True 10 ms frames, in seconds."""
    edges = np.diff(np.r_[0, flags.astype(np.int8), 0])
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return round(float(runs.max()) * FRAME_S, 3) if runs.size else 0.0


def _check_complete(declared: float | None, decoded: float) -> None:
    """Raise IncompleteAudio when well under half of what the header declares decodes.

    A download or copy that stopped early keeps its header, and a decoder meeting smashed frames
    may stop there. Analysing the fragment would present the emotion of a few words (or of the
    leading pause) as the recording's. A file with most of it decodable is still analysed, like a
    WAV whose header overstates its size.
    """
    if declared and decoded < declared * DECODED_SHARE and declared - decoded > 1.0:
        raise IncompleteAudio(f"only {decoded:.2f} s of the {declared:.1f} s the header declares could be decoded: "
                              "the file is cut short (an incomplete copy?) or damaged")


def _check_varies(low: float, high: float) -> None:
    """Raise SilentAudio when the signal's range is within the silence floor (a flat line)."""
    if high - low < SILENT_SPAN:
        raise SilentAudio("the recording is silent: its signal does not vary")


def _layout(job: JobInput, settings: Settings) -> tuple[bool, int | None]:
    """Whether to stream the recording (longer than STREAM_OVER_S, or of unknown length) and how
    many channels it has (None: unknown; it is then decoded as mono), from the upload's probe or,
    where that did not tell, the header (the channel count only where it matters)."""
    duration, count = job.duration_s, job.channel_count
    if duration is None or (count is None and job.channels != "mix"):
        try:
            info = probe(job.path, job.format, settings.max_duration_s)
        except AudioError:
            return False, count  # the one-shot decode reports the error
        duration = info.duration_s if duration is None else duration
        count = info.channels if count is None else count
    return duration is None or duration > STREAM_OVER_S, count


class _Cutter:
    """Pass 2 of a streamed recording for one lane: cuts its segments out of the stream as it
    goes by, holding only the samples from the next segment's start on. Cut clips wait in the
    lane until STREAM_BATCH of them (or the end) are there, then go through the models together
    and only their probabilities are kept."""

    def __init__(self, spans: list[Segment]) -> None:
        self.spans, self.next = spans, 0
        self.buf, self.offset = np.zeros(0, dtype=np.float32), 0  # buf holds [offset, offset + buf.size)

    def feed(self, block: np.ndarray, lane: Lane, ensemble: Ensemble) -> None:
        self.buf = np.concatenate([self.buf, block])
        self._cut(lane, ensemble, final=False)
        upto = int(self.spans[self.next].start * SAMPLE_RATE) if self.next < len(self.spans) else \
            self.offset + self.buf.size
        drop = max(0, min(upto - self.offset, self.buf.size))
        self.buf, self.offset = self.buf[drop:], self.offset + drop

    def finish(self, lane: Lane, ensemble: Ensemble) -> None:
        self._cut(lane, ensemble, final=True)

    def _cut(self, lane: Lane, ensemble: Ensemble, final: bool) -> None:
        while self.next < len(self.spans):
            span = self.spans[self.next]
            start, end = int(span.start * SAMPLE_RATE) - self.offset, int(span.end * SAMPLE_RATE) - self.offset
            if end > self.buf.size and not final:
                break
            try:
                lane.clips.append(speech_clip(self.buf[max(start, 0) : end]))
                lane.spans.append(span)
            except SilentAudio:
                pass  # a segment of near-silence says nothing: leave it out
            self.next += 1
        if lane.clips and (final or len(lane.clips) >= STREAM_BATCH):
            for model, p in ensemble.predict_clips(lane.clips).items():
                lane.probs.setdefault(model, []).append(p)
            lane.clips = []


def _prepare_streamed(job: JobInput, settings: Settings, ensemble: Ensemble, prepared: Prepared,
                      on_progress: Progress | None = None) -> None:
    """Two passes over the decoded stream, holding about one block and a few segments at a time.

    Pass 1 measures frame energies and speech probabilities and finds the segments; pass 2 cuts
    each segment out of the stream as it goes by, and every STREAM_BATCH segments goes through
    the models. Memory stays bounded whatever the length (unless a transcript is asked for: the
    transcription stage needs the whole recording).
    """
    outcome = prepared.outcome
    started = time.perf_counter()
    meter, speech = EnergyMeter(), vad.SpeechMeter()
    low, high = np.inf, -np.inf
    for block in stream(job.path, job.format, SAMPLE_RATE, settings.max_duration_s):
        meter.feed(block)
        speech.feed(block)
        if block.size:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    energy = meter.finish()
    probabilities = speech.finish()
    outcome.duration_s = round(meter.samples / SAMPLE_RATE, 3)
    _check_complete(job.duration_s, outcome.duration_s)
    check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
    _check_varies(low, high)
    spans = vad.segments_from_probabilities(probabilities, energy, outcome.duration_s)
    if not spans:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["decode"] = _ms(started)
    started = time.perf_counter()
    lane, cutter = Lane(0, outcome.labels[0]), _Cutter(spans)
    prepared.lanes = [lane]
    kept: list[np.ndarray] = []
    for block in stream(job.path, job.format, SAMPLE_RATE, settings.max_duration_s):
        if job.transcribe:
            kept.append(block)
        cutter.feed(block, lane, ensemble)
        if on_progress is not None:
            on_progress(job.id, cutter.next / len(spans))
    cutter.finish(lane, ensemble)
    if not lane.spans:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["features"] = _ms(started)
    if job.transcribe:
        _pending_transcript(job, outcome, np.concatenate(kept))


def _prepare_streamed_channels(job: JobInput, settings: Settings, ensemble: Ensemble, prepared: Prepared,
                               count: int, on_progress: Progress | None = None) -> None:
    """``_prepare_streamed`` for a multi-channel recording: pass 1 measures every channel (and
    decides split or mix); a split one's pass 2 cuts each channel's segments from the stream.
    A recording found to be near-copies is streamed again as mono."""
    outcome = prepared.outcome
    started = time.perf_counter()
    meters: list[EnergyMeter] = []
    speech: list[vad.SpeechMeter] = []
    low, high = np.inf, -np.inf
    for block in stream_channels(job.path, job.format, SAMPLE_RATE, settings.max_duration_s, channels=count):
        if not meters:
            meters, speech = [EnergyMeter() for _ in block], [vad.SpeechMeter() for _ in block]
        for row, meter, heard in zip(block, meters, speech, strict=True):
            meter.feed(row)
            heard.feed(row)
        if block.size:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    energies = np.stack([meter.finish() for meter in meters])
    probabilities = [heard.finish() for heard in speech]
    outcome.duration_s = round(meters[0].samples / SAMPLE_RATE, 3)
    _check_complete(job.duration_s, outcome.duration_s)
    check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
    _check_varies(low, high)
    if _split_or_mix(job, energies) == "mix":
        _set_mode(outcome, job, "mix", len(meters))
        _prepare_streamed(job, settings, ensemble, prepared, on_progress)
        return
    _set_mode(outcome, job, "split", len(meters))
    own = _own_speech(energies, probabilities)
    spans = [vad.segments_from_probabilities(probabilities[i], energies[i], outcome.duration_s, keep=own[i])
             for i in range(len(meters))]
    if not any(spans):
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["decode"] = _ms(started)
    started = time.perf_counter()
    prepared.lanes = [Lane(i, label) for i, label in enumerate(outcome.labels)]
    cutters = [_Cutter(s) for s in spans]
    kept: list[np.ndarray] = []
    for block in stream_channels(job.path, job.format, SAMPLE_RATE, settings.max_duration_s, channels=count):
        if job.transcribe:
            kept.append(block)
        for row, lane, cutter in zip(block, prepared.lanes, cutters, strict=True):
            cutter.feed(row, lane, ensemble)
        if on_progress is not None:
            on_progress(job.id, sum(c.next for c in cutters) / sum(len(s) for s in spans))
    for lane, cutter in zip(prepared.lanes, cutters, strict=True):
        cutter.finish(lane, ensemble)
    if not any(lane.spans for lane in prepared.lanes):
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["features"] = _ms(started)
    if job.transcribe:
        _pending_transcript(job, outcome, np.concatenate(kept, axis=1))


def run(ensemble: Ensemble, jobs: list[JobInput], settings: Settings,
        on_progress: Progress | None = None) -> list[Outcome]:
    """Analyse a chunk; every input gets exactly one outcome, in order.

    The speech clips of all short recordings (all their lanes) go through the encoder and both
    models together; a lane's result is its segments' probabilities averaged by how much speech
    each holds, and so is a split recording's over all its lanes' segments.
    """
    prepared = [prepare(job, settings, ensemble, on_progress) for job in jobs]
    # Streamed recordings were analysed while they were cut: their lanes hold no clips.
    waiting = [(p, lane) for p in prepared for lane in p.lanes if lane.clips]
    clips = [c for _, lane in waiting for c in lane.clips]
    if clips:
        started = time.perf_counter()
        feats = ensemble.features(clips)
        waiting, feats = _drop_no_speech(ensemble, waiting, feats)
        probs = ensemble.predict_proba(feats) if feats else {}
        per_clip = _ms(started) / len(clips)
        row = 0
        for p, lane in waiting:
            n = len(lane.clips)
            lane.probs = {m: [v[row : row + n]] for m, v in probs.items()}
            lane.clips = []
            timings = p.outcome.timings_ms
            timings["inference"] = round(timings.get("inference", 0.0) + per_clip * n, 2)
            row += n
    for p in prepared:
        _conclude(p, ensemble, settings.uncertain_threshold)
        p.outcome.timings_ms["total"] = round(sum(p.outcome.timings_ms.values()), 2)
    return [p.outcome for p in prepared]


def _drop_no_speech(ensemble: Ensemble, waiting: list[tuple[Prepared, Lane]], feats: list[Features]
                    ) -> tuple[list[tuple[Prepared, Lane]], list[Features]]:
    """Empty the lanes that Silero barely heard and the speech detector, on the same encoder
    vectors the models read, calls non-speech; the rest go on to the models. (A recording left
    with no lane is failed ``no_speech`` by ``_conclude``.)"""
    kept: list[tuple[Prepared, Lane]] = []
    kept_feats: list[Features] = []
    row = 0
    for p, lane in waiting:
        mine = feats[row : row + len(lane.clips)]
        row += len(lane.clips)
        if lane.silero_longest_s < SURE_SPEECH_S and ensemble.no_speech(lane.silero_longest_s, mine):
            lane.clips, lane.spans = [], []
            continue
        kept.append((p, lane))
        kept_feats.extend(mine)
    return kept, kept_feats


def _conclude(p: Prepared, ensemble: Ensemble, cut: float | None) -> None:
    """The outcome of an analysed recording: each lane's prediction and segments, the recording's
    (a split one's over all its lanes' segments, weighted by speech), the channels and the
    conversation. A recording none of whose lanes has speech left fails ``no_speech``."""
    outcome, heard = p.outcome, [lane for lane in p.lanes if lane.probs]
    if outcome.error_code:
        return
    if not heard:
        outcome.error_code, outcome.error_message = NoSpeech.code, NO_SPEECH_MESSAGE
        outcome.audio = outcome.transcript = None
        return
    stacked = {lane.index: {m: np.concatenate(v) for m, v in lane.probs.items()} for lane in heard}
    entries = []
    for lane in p.lanes:
        probs = stacked.get(lane.index)
        prediction = None if probs is None else ensemble.combine(probs, range(len(lane.spans)), _weights(lane), cut)
        segments = [] if probs is None else [_segment(ensemble.combine(probs, [r], np.ones(1), cut), span)
                                             for r, span in enumerate(lane.spans)]
        entries.append(_channel(lane, prediction, segments))
    if outcome.mode == "split":
        every = {m: np.concatenate([stacked[lane.index][m] for lane in heard]) for m in stacked[heard[0].index]}
        weights = np.concatenate([_weights(lane) for lane in heard])
        outcome.prediction = ensemble.combine(every, range(weights.size), weights, cut)
        outcome.segments = merged(entries)
    else:
        (lane,) = heard
        outcome.prediction = ensemble.combine(stacked[lane.index], range(len(lane.spans)), _weights(lane), cut)
        outcome.segments = entries[0]["segments"]
    outcome.channels = entries
    converse(outcome)
    p.lanes = []


def _weights(lane: Lane) -> np.ndarray:
    # Weighted by speech, not by span: a segment that is mostly silence counts for little.
    return np.array([max(span.speech_s, 0.01) for span in lane.spans])


def _segment(prediction: Prediction, span: Segment) -> dict[str, Any]:
    """A result's segment as stored and served (``ser_shared.schemas.Segment``)."""
    return schemas.Segment(start=span.start, end=span.end, speech_s=span.speech_s, emotion=prediction.emotion,
                           confidence=prediction.confidence, uncertain=prediction.uncertain,
                           probabilities=prediction.probabilities).to_json()


def _channel(lane: Lane, prediction: Prediction | None, segments: list[dict[str, Any]]) -> dict[str, Any]:
    """A lane as ``schemas.Channel`` (its ``metrics`` come with the conversation, see ``converse``)."""
    return {"index": lane.index, "label": lane.label,
            "emotion": prediction.emotion if prediction else None,
            "confidence": prediction.confidence if prediction else None,
            "uncertain": prediction.uncertain if prediction else None,
            "probabilities": prediction.probabilities if prediction else None,
            "speech_s": round(sum(s["speech_s"] for s in segments), 3), "segments": segments}


def merged(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """All channels' segments in time order (the same dicts): a split recording's ``segments``."""
    tagged = sorted(((s["start"], s["end"], e["index"], i) for e in entries for i, s in enumerate(e["segments"])))
    by_index = {e["index"]: e["segments"] for e in entries}
    return [by_index[index][i] for _, _, index, i in tagged]


def converse(outcome: Outcome) -> None:
    """Each channel's ``metrics`` and the outcome's ``conversation`` from the channels' segments
    (again once they carry transcripts: words per minute, the conversation transcript)."""
    entries = outcome.channels or []
    tracks = [conversation.Track(e["index"], e["label"], e["segments"]) for e in entries]
    customer = conversation.customer_index([e["label"] for e in entries])
    metrics, outcome.conversation = conversation.analyse(tracks, outcome.duration_s or 0.0, outcome.mode, customer)
    for entry, m in zip(entries, metrics, strict=True):
        entry["metrics"] = m
