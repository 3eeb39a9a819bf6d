"""bench.codebook_corpus keeps the question out of a sampled reply, whatever preamble the model wrote."""

from __future__ import annotations

from bench.codebook_corpus import the_question


def test_the_question_drops_a_quoting_preamble_and_what_follows_the_question_mark():
    reply = 'One short trivia question about capital cities is: "What is the capital of Chile?" Santiago.'
    assert the_question(reply) == "What is the capital of Chile?"


def test_the_question_reads_the_first_line_only_and_rejects_replies_without_a_question():
    assert the_question("Which planet is largest?\nJupiter, by far?") == "Which planet is largest?"
    assert the_question("Jupiter is the largest planet.") is None
    assert the_question("Why?") is None  # too short to be a trivia question
