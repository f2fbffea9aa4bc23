"""Scoring rules checked against hand-worked cases (LongBench qa_f1 conventions), needle matching,
the needle insertion, and the network model's arithmetic."""

import math

import pytest

from kvc.evaluation.needle import Needle, answer_correct, insert_needle, make_needle
from kvc.evaluation.qa import best_em, best_f1, exact_match, normalize_answer, token_f1
from kvc.evaluation.timing import Breakdown, median_breakdown, parse_bandwidths, transfer_seconds


def test_normalize_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The  Eiffel-Tower, in Paris!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_token_f1_hand_worked():
    # prediction "a meadow near sintra" -> [meadow, near, sintra]; truth "near Sintra" -> [near, sintra]
    # overlap 2: precision 2/3, recall 2/2, F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert token_f1("a meadow near Sintra", "near Sintra") == pytest.approx(0.8)
    # repeated tokens count once per occurrence in both: [the, cat, cat] vs [cat]: overlap 1, P 1/2, R 1
    assert token_f1("the cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "cat") == 0.0


def test_exact_match_and_best_over_answers():
    assert exact_match("The answer: 1998.", "1998") == 0.0  # EM is strict after normalisation
    assert exact_match("1998.", "1998") == 1.0
    assert best_em("Green", ["red", "green"]) == 1.0
    assert best_f1("in green ink", ["green", "green ink"]) == pytest.approx(0.8)  # 2/3 P, 1 R on "green ink"
    assert best_f1("x", []) == 0.0


def test_needle_answer_must_be_the_exact_code_first():
    assert answer_correct("The secret code for the blue door is 4172.", "4172")
    assert answer_correct("4172", "4172")
    assert not answer_correct("417", "4172")
    assert not answer_correct("41723", "4172")
    assert not answer_correct("In 2020 it was 4172", "4172")  # the first number is the answer
    assert not answer_correct("assistant", "4172")


def test_needle_is_deterministic_and_inserted_at_a_sentence_boundary():
    assert make_needle(1024, 0.5) == make_needle(1024, 0.5)
    needle = Needle("the blue door", "4172")
    text = "One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten. "
    out = insert_needle(text, needle, 0.5)
    assert needle.sentence in out
    before = out[: out.index(needle.sentence)]
    assert before.endswith(". ") and abs(len(before) - len(text) / 2) < 8
    assert insert_needle(text, needle, 0.0).index(needle.sentence) < 6


def test_bandwidth_model():
    assert parse_bandwidths("0.1, 1,10") == [0.1, 1.0, 10.0]
    assert parse_bandwidths("") == []
    with pytest.raises(ValueError):
        parse_bandwidths("0,1")
    # 125 MB at 1 Gbit/s is one second
    assert transfer_seconds(125_000_000, 1.0) == pytest.approx(1.0)
    b = Breakdown(read=0.5, decode=0.1, build=0.2, first=0.3)
    assert b.total == pytest.approx(1.1)
    assert b.at_bandwidth(125_000_000, 10.0) == pytest.approx(0.1 + 0.1 + 0.2 + 0.3)  # read is replaced
    m = median_breakdown([{"build": 1.0, "first": 3.0}, {"build": 2.0, "first": 1.0}, {"build": 9.0, "first": 2.0}])
    assert (m.build, m.first, m.samples) == (2.0, 2.0, 3)
    assert not math.isnan(m.total)
