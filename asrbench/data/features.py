"""Kaldi log-mel filterbanks, low-frame-rate stacking, global CMVN, and their disk cache.

Pipeline per utterance: 16-bit-scaled samples -> `torchaudio.compliance.kaldi.fbank`
(80 bins, 25 ms window, 10 ms shift) -> low-frame-rate stacking (`stack` consecutive frames
concatenated, every `skip`-th kept: 3 and 3 give 240-dim frames every 30 ms, as in the LFR
LSTM acoustic models of Pundak & Sainath 2016 and Amazon's GTC-BMUF paper, Interspeech 2019)
-> global mean/variance normalisation with statistics of the TRAIN split only.

Cache layout, one directory per split and content key:

    <cache_dir>/<split>-<key>/shard-00000.pt    {utt_ids, lengths, feats, skipped, sum, sumsq, ...}
    <cache_dir>/<split>-<key>/skipped.txt       utt_id<TAB>reason, when any were skipped
    <cache_dir>/train-<key>/cmvn.pt             {mean, std, frames}

`key` hashes every feature knob that changes the stored values or layout, the sorted utterance
ids, and each audio file's size and mtime, so any change builds a fresh directory. A shard
holds `shard_utterances` consecutive utterances as ONE concatenated tensor plus per-utterance
lengths: one `torch.load(mmap=True, weights_only=True)` per shard maps it without copying,
and an utterance is a slice. Raw (un-normalised) stacked frames are stored so the CMVN of a
new train set never forces recomputing dev/test. float16 halves disk and page-cache use; its
rounding (relative 2^-11, < 0.01 on log-mel values below 32) is far below a CMVN unit (a
per-dimension std of 2-5). Each shard and cmvn.pt is written to a temporary file and renamed,
so an interrupted run leaves only complete shards, and the next run computes just the rest.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from tqdm.auto import tqdm

from asrbench.data.utterance import Utterance, check_sample_rate, decode_audio
from asrbench.errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ON_BAD_UTTERANCE = ("error", "skip")
_WINDOWS = ("povey", "hamming", "hanning", "rectangular", "blackman")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NOT_IN_KEY = frozenset({"num_workers"})  # changes speed, never values


@dataclass(frozen=True)
class FeatureConfig:
    """Every feature knob; defaults and units in conf/features/default.yaml."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0
    preemphasis_coefficient: float = 0.97
    window_type: str = "povey"
    low_freq: float = 20.0
    high_freq: float = 0.0
    remove_dc_offset: bool = True
    snip_edges: bool = True
    use_energy: bool = False
    energy_floor: float = 1.0
    waveform_scale: float = 32768.0
    stack: int = 3
    skip: int = 3
    min_frames: int = 1
    cache_dtype: str = "float16"
    shard_utterances: int = 500
    num_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("sample_rate", "num_mel_bins", "stack", "skip", "min_frames", "shard_utterances",
                     "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"features.{name} must be a positive integer, got {value!r}")
        for name in ("frame_length_ms", "frame_shift_ms", "waveform_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"features.{name} must be positive, got {getattr(self, name)!r}")
        if self.dither < 0:
            raise ConfigError(f"features.dither must be >= 0, got {self.dither!r}")
        if self.window_type not in _WINDOWS:
            raise ConfigError(f"features.window_type must be one of {', '.join(_WINDOWS)}, "
                              f"got {self.window_type!r}")
        if self.cache_dtype not in _DTYPES:
            raise ConfigError(f"features.cache_dtype must be float16 or float32, got {self.cache_dtype!r}")

    @property
    def dim(self) -> int:
        """Width of a stacked frame: (mel bins [+ energy]) x stack."""
        return (self.num_mel_bins + int(self.use_energy)) * self.stack

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    def fbank_kwargs(self) -> dict:
        """Arguments of torchaudio.compliance.kaldi.fbank."""
        return dict(num_mel_bins=self.num_mel_bins, frame_length=self.frame_length_ms,
                    frame_shift=self.frame_shift_ms, dither=self.dither,
                    preemphasis_coefficient=self.preemphasis_coefficient, window_type=self.window_type,
                    low_freq=self.low_freq, high_freq=self.high_freq, remove_dc_offset=self.remove_dc_offset,
                    snip_edges=self.snip_edges, use_energy=self.use_energy, energy_floor=self.energy_floor,
                    sample_frequency=float(self.sample_rate))

    def key_fields(self) -> dict:
        """The knobs that change what the cache stores."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_KEY}


def stacked_frame_times(cfg: FeatureConfig) -> float:
    """Seconds between stacked frames, `shift_s = skip * frame_shift`.

    Stacked frame t starts at `t * shift_s` and covers the fbank windows of frames
    `t*skip .. t*skip + stack - 1`, i.e. up to `t*shift_s + (stack-1)*frame_shift + frame_length`;
    a time `s` therefore falls in stacked frame `int(s / shift_s)`.
    """
    return cfg.skip * cfg.frame_shift_ms / 1000


# ---------------------------------------------------------------- per-utterance features
def compute_fbank(samples: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """(num_samples,) float samples in [-1, 1] -> (T, num_mel_bins) Kaldi log-mel filterbank.

    Kaldi reads 16-bit audio as integers, so samples are scaled by `waveform_scale` (2^15) first;
    with the log, that only shifts every value, but it keeps the energy floor where Kaldi has it.
    """
    width = cfg.num_mel_bins + int(cfg.use_energy)
    if samples.numel() < cfg.window_samples:
        return samples.new_zeros(0, width)
    return kaldi.fbank(samples[None] * cfg.waveform_scale, **cfg.fbank_kwargs())


def stack_frames(feats: torch.Tensor, stack: int, skip: int) -> torch.Tensor:
    """Low-frame-rate stacking: (T, D) -> (T', stack*D), row t = frames t*skip .. t*skip+stack-1.

    `T' = (T - stack) // skip + 1` (0 when T < stack): no frame is invented at the end.
    """
    num, width = feats.shape
    if num < stack:
        return feats.new_zeros(0, stack * width)
    return feats.unfold(0, stack, skip).transpose(1, 2).reshape(-1, stack * width)


class _Featurized(NamedTuple):
    feats: torch.Tensor | None  # raw stacked frames in the cache dtype; None when skipped
    reason: str  # why it is skipped, "<kind> (<detail>)"
    seconds: float  # audio duration
    moments: torch.Tensor | None  # (2, dim) float64: sum and sum of squares of the stored values


def _featurize(utt: Utterance, cfg: FeatureConfig) -> _Featurized:
    """Raw stacked features of one utterance and their first two moments, or why it is skipped."""
    if not utt.text:
        return _Featurized(None, f"empty transcript (line in {utt.transcript_file})", 0.0, None)
    fbank = utt.source.fbank(cfg) if utt.source is not None else None
    if fbank is not None:  # precomputed by the corpus (lhotse cuts with features)
        seconds = fbank.shape[0] * cfg.frame_shift_ms / 1000
    else:
        try:
            samples, sample_rate = decode_audio(utt.audio) if utt.source is None else utt.source.samples()
        except CorpusError as exc:  # "<path>: unreadable audio (...); <hint>" -> "unreadable audio (...)"
            return _Featurized(None, str(exc).removeprefix(f"{utt.audio}: ").rsplit("; ", 1)[0], 0.0, None)
        check_sample_rate(utt.audio, sample_rate, cfg.sample_rate)  # a config mismatch: never skipped
        seconds = samples.numel() / sample_rate
        fbank = _fbank(utt, samples, cfg)
    feats = stack_frames(fbank, cfg.stack, cfg.skip)
    if feats.shape[0] < cfg.min_frames:
        reason = f"too short ({feats.shape[0]} stacked frames < features.min_frames={cfg.min_frames})"
        return _Featurized(None, reason, seconds, None)
    stored = feats.to(_DTYPES[cfg.cache_dtype])
    x64 = stored.double()
    return _Featurized(stored, "", seconds, torch.stack([x64.sum(0), (x64 * x64).sum(0)]))


def _fbank(utt: Utterance, samples: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    if cfg.dither > 0:  # Kaldi dither draws from the global generator: seed it per utterance
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(utt.utt_id.encode()))
            return compute_fbank(samples, cfg)
    return compute_fbank(samples, cfg)


def _bad_utterance_error(utt: Utterance, reason: str) -> CorpusError:
    return CorpusError(f"{utt.audio}: {reason}; fix or remove utterance {utt.utt_id}, or set "
                       f"data.on_bad_utterance=skip to leave such utterances out")


# ---------------------------------------------------------------- cache
def cache_key(utts: Sequence[Utterance], cfg: FeatureConfig) -> str:
    """Hash of the feature knobs, the sorted utterance ids and each audio file's size and mtime
    (plus, for a segment, a pipe or a cut, what its source stamps: span, command, feature file)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **cfg.key_fields()}, sort_keys=True).encode())
    for utt in sorted(utts, key=lambda u: u.utt_id):
        stamp = file_stamp(utt.audio) if utt.source is None else utt.source.stamp()
        digest.update(f"{utt.utt_id}\t{stamp}\n".encode())
    return digest.hexdigest()[:16]


def file_stamp(path: Path) -> str:
    """`size<TAB>mtime_ns` of a file: what the cache key records of an utterance's audio."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CorpusError(f"{path}: cannot stat audio file ({exc.strerror}); restore it") from None
    return f"{st.st_size}\t{st.st_mtime_ns}"


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One builder per cache directory: ranks started together wait, then read the cache."""
    try:
        f = open(cache_dir / ".lock", "w")
    except OSError:  # a read-only, complete cache needs no lock
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_shard(path: Path, expected_ids: Sequence[str], cfg: FeatureConfig) -> dict | None:
    """A complete shard holding exactly `expected_ids`, memory-mapped; None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        shard = torch.load(path, mmap=True, weights_only=True)
        ids = list(shard["utt_ids"]) + [u for u, _ in shard["skipped"]]
        ok = (sorted(ids) == sorted(expected_ids) and shard["feats"].shape[1] == cfg.dim
              and int(shard["lengths"].sum()) == shard["feats"].shape[0])
    except Exception as exc:  # any damage means: compute it again
        log.warning("feature shard %s unreadable (%s); recomputing it", path, " ".join(str(exc).split()))
        return None
    if not ok:
        log.warning("feature shard %s does not match its utterances; recomputing it", path)
        return None
    return shard


def _compute_shard(utts: Sequence[Utterance], cfg: FeatureConfig, pool: Executor, on_bad_utterance: str,
                   bar: tqdm) -> dict:
    kept, feats, skipped, seconds = [], [], [], 0.0
    moments = torch.zeros(2, cfg.dim, dtype=torch.float64)
    for utt, result in zip(utts, pool.map(_featurize, utts, [cfg] * len(utts))):
        bar.update(1)
        seconds += result.seconds
        if result.feats is None:
            if on_bad_utterance == "error":
                raise _bad_utterance_error(utt, result.reason)
            skipped.append([utt.utt_id, result.reason])
        else:
            kept.append(utt.utt_id)
            feats.append(result.feats)
            moments += result.moments
    cat = torch.cat(feats) if feats else torch.zeros(0, cfg.dim, dtype=_DTYPES[cfg.cache_dtype])
    return {"version": CACHE_VERSION, "utt_ids": kept, "skipped": skipped, "audio_seconds": seconds,
            "lengths": torch.tensor([len(f) for f in feats], dtype=torch.long), "feats": cat,
            "sum": moments[0], "sumsq": moments[1]}


def _build_split(name: str, utts: Sequence[Utterance], cfg: FeatureConfig, cache_dir: Path,
                 pool: Executor, on_bad_utterance: str, progress: bool) -> tuple[Path, list[dict]]:
    """All shards of one split, computing only those not yet on disk."""
    split_dir = cache_dir / f"{name}-{cache_key(utts, cfg)}"
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob(".*.tmp"):  # left by an interrupted run; we hold the lock
        stale.unlink()
    size = cfg.shard_utterances
    chunks = [utts[i:i + size] for i in range(0, len(utts), size)]
    paths = [split_dir / f"shard-{j:05d}.pt" for j in range(len(chunks))]
    shards = [_load_shard(p, [u.utt_id for u in c], cfg) for p, c in zip(paths, chunks)]
    todo = [j for j, s in enumerate(shards) if s is None]
    if todo:
        t0 = time.perf_counter()
        total = sum(len(chunks[j]) for j in todo)
        with tqdm(total=total, desc=f"fbank {name}", unit="utt", disable=not progress, leave=False) as bar:
            for j in todo:
                _save_atomic(_compute_shard(chunks[j], cfg, pool, on_bad_utterance, bar), paths[j])
                shards[j] = _load_shard(paths[j], [u.utt_id for u in chunks[j]], cfg)
                assert shards[j] is not None, paths[j]
        elapsed = time.perf_counter() - t0
        hours = sum(float(shards[j]["audio_seconds"]) for j in todo) / 3600
        log.info("features %s: %d utterances, %.2f h of audio in %.1f s (%.1f h of audio per minute)",
                 name, total, hours, elapsed, hours * 60 / max(elapsed, 1e-9))
    skipped = [(u, r) for s in shards for u, r in s["skipped"]]
    if skipped:
        if on_bad_utterance == "error":
            by_id = {u.utt_id: u for u in utts}
            raise _bad_utterance_error(by_id[skipped[0][0]], skipped[0][1])
        listing = split_dir / "skipped.txt"
        _write_text_atomic("".join(f"{u}\t{r}\n" for u, r in skipped), listing)
        kinds = Counter(r.split(" (")[0] for _, r in skipped)  # reasons read "<kind> (<detail>)"
        log.warning("features %s: skipped %d of %d utterances (%s); list in %s", name, len(skipped), len(utts),
                    ", ".join(f"{n} {k}" for k, n in kinds.most_common()), listing)
        if len(skipped) == len(utts):
            raise CorpusError(f"{listing}: every utterance of split {name!r} was skipped; fix the corpus "
                              f"(first reason: {skipped[0][1]})")
    return split_dir, shards


def _cmvn(split_dir: Path, shards: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Global mean and standard deviation per dimension over all frames of the shards."""
    path = split_dir / "cmvn.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            log.warning("%s unreadable; recomputing it", path)
    frames = sum(int(s["lengths"].sum()) for s in shards)
    total = torch.stack([s["sum"] for s in shards]).sum(0)
    total_sq = torch.stack([s["sumsq"] for s in shards]).sum(0)
    mean = total / frames
    var = (total_sq / frames - mean * mean).clamp_min(1e-10)  # Kaldi's variance floor
    stats = {"mean": mean.float(), "std": var.sqrt().float(), "frames": torch.tensor(frames)}
    _save_atomic(stats, path)
    return stats


# ---------------------------------------------------------------- in-memory view
class SplitFeatures:
    """One split's normalised features; shards stay memory-mapped and an utterance is a slice.

    `feats(i)` is `(raw - mean) / std` in float32, shape `(lengths[i], dim)`.
    """

    def __init__(self, shard_paths: Sequence[Path], utt_ids: Sequence[str], texts: Sequence[str],
                 lengths: torch.Tensor, shard_index: torch.Tensor, offsets: torch.Tensor,
                 cmvn: Mapping[str, torch.Tensor], shards: Sequence[torch.Tensor] | None = None) -> None:
        assert len(utt_ids) == len(texts) == len(lengths) == len(shard_index) == len(offsets)
        self.utt_ids = list(utt_ids)
        self.texts = list(texts)
        self.lengths = lengths
        self.mean = cmvn["mean"].float()
        self.std = cmvn["std"].float()
        self._mean_np = self.mean.numpy()
        self._inv_std_np = (1.0 / self.std).numpy()
        self._shard_paths = [Path(p) for p in shard_paths]
        self._shard_index = shard_index.tolist()
        self._offsets = offsets.tolist()
        self._lengths = lengths.tolist()
        self._shards = list(shards) if shards is not None else None

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())

    @property
    def cmvn(self) -> dict[str, torch.Tensor]:
        """The normalisation statistics (train split's), e.g. to store beside a model."""
        return {"mean": self.mean, "std": self.std}

    def _tensors(self) -> list[torch.Tensor]:
        if self._shards is None:
            self._shards = [torch.load(p, mmap=True, weights_only=True)["feats"] for p in self._shard_paths]
        return self._shards

    def feats(self, i: int) -> torch.Tensor:
        start = self._offsets[i]
        raw = self._tensors()[self._shard_index[i]][start:start + self._lengths[i]].numpy()
        # numpy, not torch: small elementwise torch ops on the main thread wait on the intra-op
        # pool, 10x slower on a busy machine (measured); the result is the same float32 math
        x = raw.astype(np.float32)
        x -= self._mean_np
        x *= self._inv_std_np
        return torch.from_numpy(x)

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn re-map the shards
        return {**self.__dict__, "_shards": None}


def _split_features(utts: Sequence[Utterance], paths: Sequence[Path], shards: Sequence[dict],
                    cmvn: Mapping[str, torch.Tensor]) -> SplitFeatures:
    text_of = {u.utt_id: u.text for u in utts}
    ids, index, offsets = [], [], []
    for j, shard in enumerate(shards):
        ids += shard["utt_ids"]
        index += [j] * len(shard["utt_ids"])
        lengths = shard["lengths"]
        offsets.append(torch.cumsum(lengths, 0) - lengths)
    lengths = torch.cat([s["lengths"] for s in shards])
    return SplitFeatures(paths, ids, [text_of[u] for u in ids], lengths, torch.tensor(index, dtype=torch.long),
                         torch.cat(offsets), cmvn, [s["feats"] for s in shards])


def prepare_features(splits: Mapping[str, Sequence[Utterance]], cfg: FeatureConfig, cache_dir: Path, *,
                     progress: bool = True, on_bad_utterance: str = "skip",
                     cmvn: Mapping[str, torch.Tensor] | None = None) -> dict[str, SplitFeatures]:
    """Features of every split, normalised with the "train" split's statistics.

    Computes (with a progress bar) whatever the cache under `cache_dir` lacks and reuses the
    rest. `on_bad_utterance="skip"` leaves out empty transcripts, unreadable audio and
    utterances shorter than `cfg.min_frames` stacked frames, with a warning and a `skipped.txt`;
    `"error"` raises CorpusError on the first. `cmvn` ({mean, std}) replaces the train
    statistics when no "train" split is given (e.g. evaluating a trained model).
    """
    if on_bad_utterance not in ON_BAD_UTTERANCE:
        raise ConfigError(f"data.on_bad_utterance must be error or skip, got {on_bad_utterance!r}")
    if "train" not in splits and cmvn is None:
        raise ValueError("prepare_features needs a 'train' split (CMVN statistics) or cmvn={mean, std}")
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"{cache_dir}: cannot create the feature cache ({exc.strerror}); set data.cache_dir "
                          f"to a writable directory") from None
    ordered = {name: sorted(utts, key=lambda u: u.utt_id) for name, utts in splits.items()}
    for name, utts in ordered.items():
        if not utts:
            raise ValueError(f"split {name!r} has no utterances")
    if on_bad_utterance == "error":  # fail before any computing
        for utts in ordered.values():
            for utt in utts:
                if not utt.text:
                    raise _bad_utterance_error(utt, f"empty transcript (line in {utt.transcript_file})")
    built: dict[str, tuple[Path, list[dict]]] = {}
    # Worker threads even for one worker: torch ops on the main thread use the intra-op pool,
    # whose barriers cost 10x on a busy 2-core machine (measured); the GIL is released in fbank
    # and in FLAC decoding, so threads scale without pickling anything.
    workers = cfg.num_workers if cfg.dither == 0 else 1  # dither seeds the global generator
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fbank")
    try:
        with _locked(cache_dir):
            for name, utts in ordered.items():
                built[name] = _build_split(name, utts, cfg, cache_dir, pool, on_bad_utterance, progress)
            stats = _cmvn(*built["train"]) if "train" in built else dict(cmvn)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    out = {}
    for name, (split_dir, shards) in built.items():
        paths = [split_dir / f"shard-{j:05d}.pt" for j in range(len(shards))]
        out[name] = _split_features(ordered[name], paths, shards, stats)
    return out
