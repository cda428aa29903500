import math

import jiwer
import pytest
import torch

from asrbench import metrics


def test_wer_cer_known_cases():
    assert metrics.wer(["A B C D"], ["A X C"]) == 0.5  # one substitution, one deletion / 4 words
    assert metrics.wer(["A B", "C D"], ["A B", "C D"]) == 0.0
    assert math.isclose(metrics.cer(["ABCD"], ["ABXD"]), 0.25)
    assert metrics.wer(["A B"], [""]) == 1.0  # empty hypothesis: all deleted


def test_frame_errors_ignore_padding():
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]])
    labels = torch.tensor([[0, 1, 1, -100]])
    assert metrics.frame_errors(logits, labels) == (1, 3)


def test_relative_change_is_the_papers_measure():
    assert math.isclose(metrics.relative_change(0.103, 0.1), 0.03)
    assert metrics.relative_change(0.09, 0.1) < 0
    assert math.isnan(metrics.relative_change(0.1, 0.0))


def test_wandb_runs_offline_unless_logged_in(monkeypatch, tmp_path):
    from asrbench.experiment import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_per_speaker_scores_group_by_the_utterance_ids_speaker():
    from asrbench.model.evaluate import by_speaker
    from asrbench.report import per_speaker_table

    ids = ["300-30000-0000", "300-30000-0001", "302-30200-0000"]
    out = by_speaker(ids, ["A B", "C D", "E F"], ["A B", "C X", "Q"])
    # by hand: speaker 300, 1 of 4 words and 1 of 6 characters ("A B" + "C D", spaces counted) wrong;
    # speaker 302, "E F" -> "Q": 1 substitution and 2 deletions of 3 characters
    assert out == {"300": {"wer": 0.25, "cer": pytest.approx(1 / 6), "utterances": 2},
                   "302": {"wer": 1.0, "cer": pytest.approx(1.0), "utterances": 1}}
    table = per_speaker_table({"eval": {"test": {"speakers": out}}})
    assert "| test | 300 | 25.0% |" in table and "| test | 302 | 100.0% |" in table
    assert per_speaker_table({"eval": {"test": {"wer": 0.5}}}) == ""


def test_utterance_errors_sum_to_jiwers_corpus_rates():
    refs = ["THE CAT SAT", "ON THE MAT", "A DOG", "HELLO"]
    hyps = ["THE CAT SAT", "ON A MAT THERE", "", "HELO"]
    counts = metrics.utterance_errors(refs, hyps)
    # by hand: 0; 1 substitution + 1 insertion; 2 deletions; 1 substitution
    assert counts["wer_errors"] == [0, 2, 2, 1] and counts["wer_counts"] == [3, 3, 2, 1]
    assert sum(counts["wer_errors"]) / sum(counts["wer_counts"]) == pytest.approx(jiwer.wer(refs, hyps))
    assert counts["cer_errors"][3] == 1 and counts["cer_counts"] == [11, 10, 5, 5]
    assert sum(counts["cer_errors"]) / sum(counts["cer_counts"]) == pytest.approx(jiwer.cer(refs, hyps))


def test_frame_errors_per_row_ignore_padding():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, 1, -100], [0, 1, 1]])
    assert metrics.frame_errors_per_row(logits, labels) == ([1, 2], [2, 3])


def test_word_edits_split_by_kind_add_up_to_the_edit_distance():
    refs = ["THE CAT SAT", "ON THE MAT", "A DOG", "HELLO", "GO  HOME ", "", ""]
    hyps = ["THE CAT SAT", "ON A MAT THERE", "", "HELO", "GO HOME", "UH", None]
    counts = metrics.utterance_errors(refs, hyps)
    # by hand: exact; 1 substitution + 1 insertion; 2 deletions (empty hypothesis); 1 substitution;
    # the same words spaced differently; an empty reference with 1 inserted word; both empty
    assert counts["sub_errors"] == [0, 1, 0, 1, 0, 0, 0]
    assert counts["del_errors"] == [0, 0, 2, 0, 0, 0, 0]
    assert counts["ins_errors"] == [0, 1, 0, 0, 0, 1, 0]
    assert counts["ser_errors"] == [0, 1, 1, 1, 0, 1, 0] and counts["ser_counts"] == [1] * 7
    for kind in ("sub", "del", "ins"):
        assert counts[f"{kind}_counts"] == counts["wer_counts"] == [3, 3, 2, 1, 2, 0, 0]
    # against torchaudio's edit distance, utterance by utterance, and jiwer's corpus totals
    assert [s + d + i for s, d, i in zip(counts["sub_errors"], counts["del_errors"], counts["ins_errors"])] \
        == counts["wer_errors"] == [0, 2, 2, 1, 0, 1, 0]
    out = jiwer.process_words(refs[:4], hyps[:4])
    assert (sum(counts["sub_errors"][:4]), sum(counts["del_errors"][:4]), sum(counts["ins_errors"][:4])) \
        == (out.substitutions, out.deletions, out.insertions)


def test_word_edit_kinds_agree_with_torchaudio_on_random_sentences():
    import random

    from torchaudio.functional import edit_distance

    rng = random.Random(3)
    vocab = ["A", "B", "C", "D", "E"]
    refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8))) for _ in range(300)]
    hyps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8))) for _ in range(300)]
    kinds = metrics.word_edit_kinds(refs, hyps)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        assert kinds["sub_errors"][i] + kinds["del_errors"][i] + kinds["ins_errors"][i] \
            == edit_distance(r.split(), h.split())
        assert kinds["ser_errors"][i] == int(r.split() != h.split())
    assert metrics.word_edit_kinds([], []) == {k: [] for k in kinds}


def test_scores_tables_with_and_without_edit_kinds_load():
    from asrbench import stats

    new = {"ids": ["1-1-0", "1-1-1"], **metrics.utterance_errors(["A B", "C"], ["A", "D E"])}
    sc = stats.Scores.from_table(new)
    assert set(sc.errors) == {"wer", "cer", "sub", "del", "ins", "ser"}
    assert sc.rate("sub") + sc.rate("del") + sc.rate("ins") == pytest.approx(sc.rate("wer"))  # 1/3 + 1/3 + 1/3
    assert sc.rate("ser") == 1.0
    old = {k: v for k, v in new.items() if k.split("_")[0] in ("ids", "wer", "cer")}  # a file from before
    assert set(stats.Scores.from_table(old).errors) == {"wer", "cer"}
