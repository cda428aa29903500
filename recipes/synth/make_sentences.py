#!/usr/bin/env python3
"""Rebuild data/text/kjv_sentences.txt from the King James Bible (public domain).

Source: Debian package `bible-kjv-text` read with the `bible` program of package `bible-kjv`
(`apt-get install bible-kjv`). Verses are split at sentence and clause punctuation into
sentences of 4-18 words, normalised to the LibriSpeech alphabet, de-duplicated, and shuffled
with a fixed seed. The committed file is the output of this script; nothing calls it at run
time.
"""
import random
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from asrbench.data.text import normalize  # noqa: E402

out = Path(__file__).resolve().parents[2] / "data" / "text" / "kjv_sentences.txt"
raw = subprocess.run(["bible", "-f", "Genesis 1:1-Revelation 22:21"], capture_output=True,
                     text=True, check=True).stdout
seen, sentences = set(), []
for line in raw.splitlines():
    verse = line.split(" ", 1)[1] if " " in line else ""
    for piece in re.split(r"(?<=[.;:?!])\s+", verse):
        s = normalize(piece)
        if 4 <= len(s.split()) <= 18 and s not in seen:
            seen.add(s)
            sentences.append(s)
random.Random(0).shuffle(sentences)
out.write_text("\n".join(sentences) + "\n")
print(f"{len(sentences)} sentences -> {out}")
