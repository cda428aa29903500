import math

import torch

from asrbench.data import text
from asrbench.model.align import (boundary_accuracy, force_align, read_alignments, word_spans,
                                  write_alignments)
from asrbench.model.decode import greedy_decode


def peaked(labels: list[int], classes: int = text.vocab_size()) -> torch.Tensor:
    lp = torch.full((len(labels), classes), -20.0)
    lp[torch.arange(len(labels)), torch.tensor(labels)] = 0.0
    return lp.log_softmax(-1)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    a, b, sp = text.encode("A")[0], text.encode("B")[0], text.encode(" ")[0]
    path = [0, a, a, 0, a, sp, b, b, 0, 0]
    logits = peaked(path)[None]
    assert greedy_decode(logits, torch.tensor([len(path)])) == ["AA B"]
    assert greedy_decode(logits, torch.tensor([3])) == ["A"]  # length mask


def test_force_align_recovers_the_best_path_and_word_spans():
    ab, c = text.encode("AB"), text.encode("C")
    sp = text.encode(" ")[0]
    path = [0, ab[0], ab[0], 0, ab[1], 0, sp, 0, 0, c[0], c[0], 0]
    labels = force_align(peaked(path), text.encode("AB C"))
    assert labels.tolist() == path
    assert word_spans(labels) == [(1, 5), (9, 11)]


def test_force_align_refuses_too_short_utterances():
    # "AA" needs a blank between the repeats: 3 frames minimum
    assert force_align(peaked([1, 1]), text.encode("AA")) is None
    assert force_align(peaked([3, 0, 3]), text.encode("AA")) is not None


def test_boundary_accuracy_counts_words_within_tolerance():
    sp = text.encode(" ")[0]
    a = text.encode("A")[0]
    labels = torch.tensor([0, a, 0, sp, 0, 0, a, 0])  # word starts at frames 1 and 6
    frame_s = 0.03
    timings = {"u1": [("A", 0.03, 0.06), ("A", 0.30, 0.33)]}  # second start off by 0.12 s
    acc, n = boundary_accuracy({"u1": labels}, timings, frame_s, tolerance_s=0.05)
    assert (acc, n) == (0.5, 2)
    acc, n = boundary_accuracy({"u1": labels}, timings, frame_s, tolerance_s=0.2)
    assert (acc, n) == (1.0, 2)
    acc, n = boundary_accuracy({"u1": labels}, {"u1": [("A", 0, 1)]}, frame_s, 0.2)
    assert n == 0 and math.isnan(acc)


def test_alignment_files_are_text_lines_by_utterance_and_round_trip(tmp_path):
    ali = {"1-2-0001": torch.tensor([0, 3, 3, 0]), "1-2-0000": torch.tensor([5])}
    write_alignments(tmp_path / "train.ali", ali)
    # one line per utterance, sorted by id: the id, then its frame labels
    assert (tmp_path / "train.ali").read_text() == "1-2-0000 5\n1-2-0001 0 3 3 0\n"
    back = read_alignments(tmp_path, ["train"])
    assert set(back) == set(ali) and all(torch.equal(back[k], ali[k]) for k in ali)
    (tmp_path / "dev.ali").write_text("3-4-0000 1 1 2\n")  # written by hand, not by write_alignments
    assert read_alignments(tmp_path, ["dev"])["3-4-0000"].tolist() == [1, 1, 2]
