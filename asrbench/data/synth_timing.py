"""Word and phoneme timings of a synthesised utterance, from eSpeak NG's WORD and PHONEME events.

``align.json`` maps each utterance to ``{"duration": s, "words": [[WORD, start, end],
...], "phonemes": [[PHONEME, start, end], ...]}`` in seconds of the written audio (leading
padding included), taken from eSpeak's WORD and PHONEME events at sample precision:

1. A phoneme lasts from its PHONEME event to the next PHONEME event (the last one to the end
   of eSpeak's audio). Pauses (``_``, ``_:``, ``_!``) are silence and are not listed. eSpeak
   plays a stop's closure before the stop's event, so inside a word the closure counts toward
   the preceding phoneme.
2. A phoneme event at the same sample as the next one (eSpeak folds a post-vocalic /l/ into
   the vowel's frames) shares the preceding phoneme's interval with it in equal parts.
3. A word starts at its WORD event when that falls inside the preceding interval (the closure
   of a word-initial stop), otherwise at its first phoneme, and ends where its last phoneme
   ends; silence between words belongs to no word.
4. Events are matched to transcript words by character position. eSpeak speaks some word
   pairs as one dictionary entry ("of the", "in the") with one WORD event; the phonemes of such
   a group are divided among its words in proportion to their letter counts, at least one
   each. Every transcript word thus gets one interval, in order, and the intervals do not
   overlap.

Phoneme names are eSpeak's ASCII mnemonics without stress marks (``aI``, ``dZ``, ``@``, ``;``
is eSpeak's linking /j/).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from asrbench.data.synth_espeak import EVENT_PHONEME, EVENT_WORD, Event


def _strip_stress(name: str) -> str:
    return name.lstrip("',%=")


def align_events(words: Sequence[str], events: Sequence[Event], n_samples: int) -> tuple[
        list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Word and phoneme intervals, in eSpeak samples, from one utterance's events (rules 1-4 above).

    ``words`` is the transcript as spoken (``" ".join(words)`` was given to eSpeak, so event
    character positions index it, 1-based). Raises ValueError when a word group has fewer
    phonemes than words.
    """
    starts, pos = [], 1
    for w in words:
        starts.append(pos)
        pos += len(w) + 1

    def word_of(text_position: int) -> int:
        return max(bisect.bisect_right(starts, text_position) - 1, 0)

    # Rule 1: [name, start, end, word index or -1 for a pause]
    phon = [e for e in events if e[0] == EVENT_PHONEME]
    segs = []
    for k, (_, text_position, _, sample, name) in enumerate(phon):
        end = phon[k + 1][3] if k + 1 < len(phon) else n_samples
        assert sample <= end <= n_samples, (sample, end, n_samples)
        segs.append([_strip_stress(name), sample, end, -1 if name.startswith("_") else word_of(text_position)])

    # Rule 2: a run of zero-length phonemes shares the preceding phoneme's interval.
    k = 0
    while k < len(segs):
        run = k
        while run < len(segs) and segs[run][3] >= 0 and segs[run][1] == segs[run][2]:
            run += 1
        if run > k and k > 0 and segs[k - 1][3] >= 0:
            a, b, parts = segs[k - 1][1], segs[k - 1][2], run - k + 1
            cuts = [a + (b - a) * i // parts for i in range(parts + 1)]
            for i, m in enumerate(range(k - 1, run)):
                segs[m][1], segs[m][2] = cuts[i], cuts[i + 1]
        k = max(run, k + 1)
    segs = [s for s in segs if s[2] > s[1]]

    # Rule 3: a WORD event inside the preceding interval moves the word's start back to it.
    first = {}
    for i, s in enumerate(segs):
        if s[3] >= 0:
            first.setdefault(s[3], i)
    for etype, text_position, _, sample, _ in events:
        i = first.get(word_of(text_position)) if etype == EVENT_WORD else None
        if i is None or sample >= segs[i][1]:
            continue
        if i == 0:
            segs[0][1] = sample
        elif segs[i - 1][1] < sample:
            segs[i - 1][2] = segs[i][1] = sample
    phonemes = [(s[0], s[1], s[2]) for s in segs if s[3] >= 0]
    owner = [s[3] for s in segs if s[3] >= 0]

    # Rule 4: words without phonemes of their own share those of the preceding word.
    spans: list[tuple[str, int, int]] = []
    j = 0
    while j < len(words):
        group = j + 1
        while group < len(words) and group not in first:
            group += 1
        idx = [i for i, o in enumerate(owner) if j <= o < group]
        n_words, n_ph = group - j, len(idx)
        if n_ph < n_words:
            raise ValueError(f"eSpeak gave {n_ph} phonemes for the {n_words} word(s) "
                             f"{' '.join(words[j:group])!r}; use another sentence or voice")
        letters = np.cumsum([len(w) for w in words[j:group]])
        cut = [0]
        for m in range(1, n_words):
            c = round(n_ph * letters[m - 1] / letters[-1])
            cut.append(min(max(c, cut[-1] + 1), n_ph - (n_words - m)))
        cut.append(n_ph)
        for m in range(n_words):
            part = idx[cut[m]:cut[m + 1]]
            spans.append((words[j + m], phonemes[part[0]][1], phonemes[part[-1]][2]))
        j = group
    assert len(spans) == len(words)
    assert all(a < b for _, a, b in spans) and all(p[2] <= q[1] for p, q in zip(spans, spans[1:]))
    return spans, phonemes
