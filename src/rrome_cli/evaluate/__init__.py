"""Evaluation of edits: per-request metrics, fluency, collapse signals, summaries, HTML report."""

from rrome_cli.evaluate.collapse import (
    CollapseSignal,
    collapse_signals,
    first_collapse,
    first_drift,
    first_keys_full,
)
from rrome_cli.evaluate.fluency import (
    generate,
    n_gram_entropy,
    normalised_word_entropy,
    probe_entropy,
)
from rrome_cli.evaluate.html_report import render_html, write_html
from rrome_cli.evaluate.metrics import (
    Reference,
    evaluate_edits,
    evaluate_request,
    evaluate_requests,
)
from rrome_cli.evaluate.summary import bootstrap_interval, render_summary, summarise
from rrome_cli.evaluate.tokens import AnswerScore, score_answers

__all__ = [
    "AnswerScore",
    "CollapseSignal",
    "Reference",
    "bootstrap_interval",
    "collapse_signals",
    "evaluate_edits",
    "evaluate_request",
    "evaluate_requests",
    "first_collapse",
    "first_drift",
    "first_keys_full",
    "generate",
    "n_gram_entropy",
    "normalised_word_entropy",
    "probe_entropy",
    "render_html",
    "render_summary",
    "score_answers",
    "summarise",
    "write_html",
]
