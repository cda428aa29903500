"""One entry point from a data config to its utterances, whatever form the corpus is kept in.

`data.kind` picks the reader: `librispeech` and `synth` (LibriSpeech layout), `kaldi` (Kaldi
data directories), `lhotse` (lhotse manifests). Every reader returns `Utterance`s that feature
preparation reads the same way, so all forms share the feature cache and its error rules.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench.data.librispeech import scan_subsets
from asrbench.data.utterance import Utterance
from asrbench.errors import ConfigError

KINDS = ("librispeech", "synth", "kaldi", "lhotse")


def scan_split(data_cfg: Mapping, root: str | Path, subsets: Sequence[str]) -> list[Utterance]:
    """Every utterance of `subsets` (subset names under `root`), sorted by utterance id."""
    kind = data_cfg.get("kind") or "librispeech"
    if kind in ("librispeech", "synth"):
        return scan_subsets(root, subsets)
    if kind == "kaldi":
        from asrbench.data.kaldi import scan_kaldi  # only for data=kaldi (its readers import this module)

        return scan_kaldi(root, subsets, allow_pipes=bool(data_cfg.get("allow_pipes", False)))
    if kind == "lhotse":
        from asrbench.data.lhotse_corpus import scan_lhotse  # optional: needs lhotse installed

        return scan_lhotse(root, subsets, prefix=data_cfg.get("prefix") or "",
                           precomputed_features=bool(data_cfg.get("precomputed_features", False)))
    raise ConfigError(f"data.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def scan_splits(data_cfg: Mapping, root: str | Path,
                splits: Mapping[str, Sequence[str]]) -> dict[str, list[Utterance]]:
    """Feature-split name -> its utterances, for `splits` = split name -> corpus subsets."""
    return {name: scan_split(data_cfg, root, subsets) for name, subsets in splits.items()}
