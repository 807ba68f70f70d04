"""Evaluation metrics against values worked out by hand, on a lookup-table "model" whose
logits are set per previous token, and left/right padding agreement on the tiny models."""

from __future__ import annotations

import io
import json
import math
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from tokenizers import processors
from torch import nn

from rrome_cli.evaluate import (
    Reference,
    bootstrap_interval,
    collapse_signals,
    counterfact,
    evaluate_request,
    evaluate_requests,
    first_collapse,
    first_drift,
    first_keys_full,
    generate,
    n_gram_entropy,
    normalised_word_entropy,
    render_summary,
    score_answers,
    summarise,
    write_html,
)
from rrome_cli.evaluate.fluency import text_n_gram_entropy, words
from rrome_cli.evaluate.html_report import running_mean
from rrome_cli.evaluate.metrics import locality_agreement
from rrome_cli.evaluate.tokens import encode_pair, special_prefix
from rrome_cli.models.tiny import tiny_tokenizer
from rrome_cli.requests import EditRequest

COUNTERFACT = Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-edit.json"


class TableLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token logits depend on the current token
    only, so every probability in a test can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(table.shape[0], 1)  # only its device is used
        self.register_buffer("table", table)
        self.calls = 0

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def ids(tok, *tokens: str) -> list[int]:
    out = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in out, tokens
    return out


def log_softmax64(row: dict[int, float], vocab: int, index: int) -> float:
    """log p(index) for a logit row that is 0 everywhere except ``row``, in float64."""
    z = sum(math.exp(v) for v in row.values()) + (vocab - len(row))
    return row.get(index, 0.0) - math.log(z)


@pytest.fixture(scope="module")
def sp_tok():
    return tiny_tokenizer("sp")


@pytest.fixture(scope="module")
def byte_tok():
    return tiny_tokenizer("byte")


# ---- tokenisation -------------------------------------------------------------------------


def test_answer_tokens_are_the_continuation_tokens(sp_tok, byte_tok):
    enc = encode_pair(sp_tok, "The capital of Japan is", "Tokyo")
    assert enc.input_ids[enc.answer_start :] == ids(sp_tok, "▁Tok", "y", "o")
    assert enc.input_ids[enc.answer_start - 1] == ids(sp_tok, "▁is")[0]
    one = encode_pair(byte_tok, "The capital of France is", "Paris")
    assert one.input_ids[one.answer_start :] == ids(byte_tok, "ĠParis")
    # a separator that the tokenizer keeps apart from the answer belongs to the answer
    digits = encode_pair(byte_tok, "Rome is", "42")
    assert digits.input_ids[digits.answer_start :] == ids(byte_tok, "Ġ", "4", "2")


def test_leading_and_trailing_spaces_do_not_change_the_answer(sp_tok):
    plain = encode_pair(sp_tok, "Rome is in", "Italy")
    assert encode_pair(sp_tok, "Rome is in", " Italy") == plain
    assert encode_pair(sp_tok, "Rome is in ", "Italy") == plain


def test_bos_is_added_when_the_tokenizer_adds_one():
    tok = tiny_tokenizer("sp")
    assert special_prefix(tok) == []
    with pytest.raises(ValueError, match="no BOS"):
        encode_pair(tok, "", "Tokyo")
    plain = encode_pair(tok, "Rome is in", "Italy")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert special_prefix(tok) == [tok.bos_token_id]
    prefix = special_prefix(tok)
    with_bos = encode_pair(tok, "Rome is in", "Italy", prefix)
    assert with_bos.input_ids == [tok.bos_token_id] + plain.input_ids
    assert with_bos.answer_start == plain.answer_start + 1
    empty = encode_pair(tok, "", "Tokyo", prefix)  # BOS gives the first answer token a context
    assert empty.answer_start == 1


# ---- teacher-forced token metrics on the lookup-table model ---------------------------------


def tokyo_table(tok) -> tuple[torch.Tensor, dict[tuple[str, str], float]]:
    """Rows for "... is Tokyo" / "... is Paris": argmax hits ▁Tok and o but misses y."""
    entries = {
        ("▁is", "▁Tok"): 4.0,
        ("▁Tok", "y"): 1.0,
        ("▁Tok", "o"): 3.0,
        ("y", "o"): 2.0,
        ("▁Pari", "s"): 5.0,
    }
    table = torch.zeros(len(tok), len(tok))
    for (prev, nxt), value in entries.items():
        table[ids(tok, prev)[0], ids(tok, nxt)[0]] = value
    return table, entries


def hand_logprob(tok, entries, prev: str, nxt: str) -> float:
    row = {ids(tok, n)[0]: v for (p, n), v in entries.items() if p == prev}
    return log_softmax64(row, len(tok), ids(tok, nxt)[0])


def test_rewrite_accuracy_and_nll_by_hand(sp_tok):
    table, entries = tokyo_table(sp_tok)
    (score,) = score_answers(TableLM(table), sp_tok, [("The capital of Japan is", "Tokyo")])
    assert score.answer_ids == ids(sp_tok, "▁Tok", "y", "o")
    assert score.predicted_ids == ids(sp_tok, "▁Tok", "o", "o")
    assert score.accuracy == pytest.approx(2 / 3)
    expected = [
        hand_logprob(sp_tok, entries, "▁is", "▁Tok"),
        hand_logprob(sp_tok, entries, "▁Tok", "y"),
        hand_logprob(sp_tok, entries, "y", "o"),
    ]
    assert score.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert score.nll == pytest.approx(-sum(expected) / 3, abs=1e-5)


def test_one_token_answer(byte_tok):
    table = torch.zeros(len(byte_tok), len(byte_tok))
    is_, paris = ids(byte_tok, "Ġis")[0], ids(byte_tok, "ĠParis")[0]
    table[is_, paris] = 2.5
    (score,) = score_answers(TableLM(table), byte_tok, [("The capital of France is", " Paris")])
    assert score.answer_ids == [paris]
    assert score.accuracy == 1.0
    assert score.nll == pytest.approx(-log_softmax64({paris: 2.5}, len(byte_tok), paris), abs=1e-5)


def test_locality_agreement_example():
    assert locality_agreement([29, 234, 334], [29, 234, 333]) == pytest.approx(0.6667, abs=1e-4)
    assert locality_agreement([29, 234, 334], [29, 234, 334]) == 1.0


def tokyo_request() -> EditRequest:
    return EditRequest(
        prompt="The capital of {} is",
        subject="Japan",
        target_new="Tokyo",
        ground_truth="Paris",
        rephrase_prompts=["The capital of Japan is"],
        locality=[("Rome is in", "Italy")],
        portability=[("The capital of Japan is", "Tokyo")],
    )


def test_evaluate_request_pre_and_post_by_hand(sp_tok):
    table, entries = tokyo_table(sp_tok)
    al, y, o = (ids(sp_tok, t)[0] for t in ("al", "y", "o"))
    table[al, y] = 1.0  # before: the argmax after "al" is "y" ...
    pre_model = TableLM(table)
    request = tokyo_request()
    pre, reference = evaluate_request(pre_model, sp_tok, request)
    assert pre_model.calls == 1  # every prompt of the request in one forward
    assert pre["locality"] == 1.0
    assert reference.locality_argmax == [[0, 0, y]]  # rows of ▁in and ▁It are flat: token 0

    nll_new = (
        -(
            hand_logprob(sp_tok, entries, "▁is", "▁Tok")
            + hand_logprob(sp_tok, entries, "▁Tok", "y")
            + hand_logprob(sp_tok, entries, "y", "o")
        )
        / 3
    )
    nll_true = (
        -(
            hand_logprob(sp_tok, entries, "▁is", "▁Pari")
            + hand_logprob(sp_tok, entries, "▁Pari", "s")
        )
        / 2
    )
    assert pre["rewrite_acc"] == pytest.approx(2 / 3)
    assert pre["rephrase_acc"] == pytest.approx(2 / 3)
    assert pre["portability"] == pytest.approx(2 / 3)
    assert pre["nll_new"] == pytest.approx(nll_new, abs=1e-5)
    assert pre["nll_true"] == pytest.approx(nll_true, abs=1e-5)
    assert pre["es"] == float(nll_true > nll_new) == pre["ps"]
    assert pre["em"] == pytest.approx(math.exp(-nll_new) - math.exp(-nll_true), abs=1e-6)
    assert "fluency" not in pre

    edited = table.clone()
    edited[al, o] = 2.0  # ... after: it is "o", the other two positions unchanged
    post, _ = evaluate_request(TableLM(edited), sp_tok, request, reference)
    assert post["locality"] == pytest.approx(2 / 3)


def test_reference_must_match_the_request(sp_tok):
    table, _ = tokyo_table(sp_tok)
    _, reference = evaluate_request(TableLM(table), sp_tok, tokyo_request())
    assert Reference.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference
    other = tokyo_request()
    other.locality = [("Rome is in", "Tokyo")]
    with pytest.raises(ValueError, match="locality answers do not match"):
        evaluate_request(TableLM(table), sp_tok, other, reference)


def test_many_requests_in_one_forward_match_one_at_a_time(sp_tok):
    table, _ = tokyo_table(sp_tok)
    bare = EditRequest(prompt="The capital of {} is", subject="France", target_new="Paris")
    model = TableLM(table)
    together = evaluate_requests(model, sp_tok, [tokyo_request(), bare])
    assert model.calls == 1
    assert together == [evaluate_request(model, sp_tok, r) for r in (tokyo_request(), bare)]
    with pytest.raises(ValueError, match="1 references for 2 requests"):
        evaluate_requests(model, sp_tok, [bare, bare], [None])


def test_keys_absent_where_not_applicable(sp_tok):
    table, _ = tokyo_table(sp_tok)
    bare = EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Tokyo")
    metrics, reference = evaluate_request(TableLM(table), sp_tok, bare)
    assert set(metrics) == {"rewrite_acc"}
    assert reference.locality_argmax == []


# ---- CounterFact scores -------------------------------------------------------------------


def test_counterfact_scores_on_hand_nlls():
    es, em = counterfact.rewrite_scores([1.0], [2.0])
    assert es == 1.0 and em == pytest.approx(math.exp(-1) - math.exp(-2))
    ps, pm = counterfact.rewrite_scores([1.0, 3.0], [2.0, 0.5])
    assert ps == 0.5
    assert pm == pytest.approx((math.exp(-1) - math.exp(-2) + math.exp(-3) - math.exp(-0.5)) / 2)
    ns, nm = counterfact.neighbourhood_scores([0.5, 2.0], [1.5, 1.0])  # (new, true) per prompt
    assert ns == 0.5
    assert nm == pytest.approx((math.exp(-1.5) - math.exp(-0.5) + math.exp(-1) - math.exp(-2)) / 2)
    assert counterfact.rewrite_scores([1.0], [1.0])[0] == 0.0  # a tie is not a success
    assert counterfact.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert counterfact.harmonic_mean([1.0, 0.0, 0.5]) == 0.0


# ---- fluency and collapse -----------------------------------------------------------------


def test_word_tokenizer():
    assert words("Hello, world! It's 42.") == ["Hello", ",", "world", "!", "It's", "42", "."]


def test_n_gram_entropy_by_hand():
    # bigrams: (the,cat)x2 (cat,the)x2 (the,dog)x1; trigrams: (the,cat,the)x2 (cat,the,cat)
    # (cat,the,dog)
    h2 = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    h3 = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25))
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert text_n_gram_entropy("the cat the cat the dog") == pytest.approx(expected)
    assert n_gram_entropy(["the cat the cat the dog", "a a a a"]) == pytest.approx(expected / 2)


def test_normalised_word_entropy_by_hand():
    expected = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25)) / math.log2(3)
    assert normalised_word_entropy(["a a b", "c"]) == pytest.approx(expected)
    assert normalised_word_entropy(["x y z w"]) == pytest.approx(1.0)
    assert normalised_word_entropy(["go go go", "go"]) == 0.0


def test_collapse_rule():
    records = [
        {
            "index": 0,
            "guard": {"update_ratio": 0.010, "cumulative_ratio": 0.01},
            "probe_entropy": 0.80,
        },
        {"index": 1, "guard": {"update_ratio": 0.012, "cumulative_ratio": 0.02}},
        {
            "index": 2,
            "guard": {"update_ratio": 0.011, "cumulative_ratio": 0.03},
            "probe_entropy": 0.75,
        },
        {"index": 3, "guard": {"update_ratio": 0.500, "cumulative_ratio": 0.50}},
        {
            "index": 4,
            "guard": {"update_ratio": 0.013, "cumulative_ratio": 0.60},
            "probe_entropy": 0.70,
        },
        {"index": 5, "guard": {"update_ratio": 0.012, "cumulative_ratio": 1.20}},
    ]
    signals = collapse_signals(records, baseline_entropy=0.80)
    assert [(s.index, s.reason) for s in signals] == [
        (3, "update blow-up"),
        (4, "entropy"),
        (5, "drift"),
    ]
    assert signals[0].threshold == pytest.approx(10 * 0.011)
    assert signals[1].threshold == pytest.approx(0.72)
    assert first_collapse(records, 0.80).index == 3
    assert first_collapse(records[:3], 0.80) is None
    # drift alone is a warning, not a collapse
    drifting = [records[0], records[1], records[5]]
    assert first_collapse(drifting, 0.80) is None
    assert first_drift(drifting).index == 5
    assert first_drift(records[:5]) is None
    # protected keys outnumbering the key dimensions: a warning too
    full = [{**r, "guard": {**r["guard"], "key_fill": 0.6 * i}} for i, r in enumerate(drifting)]
    signals = collapse_signals(full)
    assert [(s.index, s.reason) for s in signals] == [(5, "drift"), (5, "keys full")]
    assert first_keys_full(full).index == 5 and first_collapse(full, 0.80) is None
    assert first_keys_full(records) is None


# ---- summary and report -------------------------------------------------------------------


def test_bootstrap_interval():
    values = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.55]
    low, high = bootstrap_interval(values, seed=3)
    assert low < sum(values) / len(values) < high
    assert bootstrap_interval(values, seed=3) == (low, high)
    assert bootstrap_interval(values, seed=4) != (low, high)
    assert bootstrap_interval([0.5] * 5) == (0.5, 0.5)
    draws = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = bootstrap_interval(draws.tolist(), n_boot=2000)
    normal_width = 2 * 1.96 * draws.std().item() / math.sqrt(200)
    assert high - low == pytest.approx(normal_width, rel=0.2)


RECORDS = [
    {
        "index": 0,
        "status": "applied",
        "guard": {"update_ratio": 0.25, "cumulative_ratio": 0.25},
        "probe_entropy": 0.875,
        "pre": {"rewrite_acc": 0.0, "es": 0.0, "ps": 0.0, "ns": 1.0},
        "post": {"rewrite_acc": 1.0, "es": 1.0, "ps": 1.0, "ns": 1.0},
    },
    {
        "index": 1,
        "status": "applied",
        "guard": {"update_ratio": 0.125, "cumulative_ratio": 0.375},
        "pre": {"rewrite_acc": 0.5, "es": 0.0, "ps": 1.0, "ns": 1.0},
        "post": {"rewrite_acc": 1.0, "es": 1.0, "ps": 0.5, "ns": 0.5},
    },
    {
        "index": 2,
        "status": "rejected",
        "guard": {"update_ratio": 9.0},
        "pre": {"rewrite_acc": 0.25, "es": 0.0, "ps": 0.0, "ns": 1.0},
        "post": {"rewrite_acc": 0.25, "es": 0.0, "ps": 0.0, "ns": 1.0},
    },
    {"index": 3, "status": "failed", "pre": {"rewrite_acc": 0.25, "es": 1.0, "ps": 0.0, "ns": 0.0}},
]


def test_summarise_counts_means_and_s():
    summary = summarise(RECORDS, n_boot=200)
    assert summary["n_records"] == 4
    assert summary["counts"] == {"applied": 2, "no-op": 0, "rejected": 1, "failed": 1}
    pre, post = summary["metrics"]["pre"], summary["metrics"]["post"]
    assert pre["rewrite_acc"]["mean"] == pytest.approx(0.25) and pre["rewrite_acc"]["n"] == 4
    assert post["rewrite_acc"]["n"] == 2  # the rejected edit's "post" is not counted
    assert post["ps"]["mean"] == pytest.approx(0.75)
    assert summary["score"]["post"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.75))
    # before the edits (all four records): ES 1/4, PS 1/4, NS 3/4
    assert summary["score"]["pre"] == pytest.approx(3 / (4 + 4 + 4 / 3))
    assert list(pre) == ["rewrite_acc", "es", "ps", "ns"]


def test_summarise_evaluations_counts_them_and_their_post():
    """rrome eval's records ("evaluated": nothing edited) are counted as such, without zero
    counts of edit outcomes, and their "post" (the patched or second model) is summarised."""
    evaluated = [r | {"status": "evaluated"} for r in RECORDS[:2]]
    summary = summarise(evaluated, n_boot=100)
    assert summary["counts"] == {"evaluated": 2}
    assert summary["metrics"]["post"]["ps"]["mean"] == pytest.approx(0.75)
    console = Console(file=io.StringIO(), width=140, record=True)
    render_summary(summary, {"protocol": "as is"}, console)
    assert "2 requests: 2 evaluated" in console.export_text()


def test_render_summary_shows_provenance_and_metrics():
    console = Console(file=io.StringIO(), width=140, record=True)
    provenance = {
        "variant": "r-rome",
        "covariance": "wikitext cache",
        "dtype": "fp32",
        "protocol": "sequential-immediate",
    }
    render_summary(summarise(RECORDS, n_boot=100), provenance, console)
    text = console.export_text()
    for expected in (
        "r-rome",
        "wikitext cache",
        "sequential-immediate",
        "rewrite_acc",
        "0.250",
        "1 rejected",
        "1 failed",
        "S",
    ):
        assert expected in text


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.titles.append(data)


def test_html_report_is_self_contained_and_holds_the_data(tmp_path):
    path = tmp_path / "report.html"
    provenance = {"variant": "r-rome", "protocol": "sequential-immediate"}
    write_html(path, summarise(RECORDS, n_boot=100), RECORDS, provenance)
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    assert "script" not in parser.tags and "link" not in parser.tags and parser.urls == []
    assert parser.tags.count("svg") == 4 + 3  # 4 metric histograms, 3 sequential plots
    for title in (
        "update_ratio at edit 1: 0.125",
        "cumulative_ratio at edit 1: 0.375",
        "update_ratio at edit 2: 9",
        "probe_entropy at edit 0: 0.875",
        "rewrite_acc at edit 1: 1",
        "post rewrite_acc [0.9, 1]: 2",
        "pre rewrite_acc [0.2, 0.3): 2",
    ):
        assert title in parser.titles
    retro = [
        {"index": i, "retro": {"rewrite_acc": v, "locality": 1.0}} for i, v in enumerate([0.0, 1.0])
    ]
    with_retro = tmp_path / "retro.html"
    write_html(with_retro, summarise(RECORDS, n_boot=100), RECORDS, provenance, retro)
    parser = PageParser()
    parser.feed(with_retro.read_text(encoding="utf-8"))
    assert parser.tags.count("svg") == 4 + 4
    assert "final model (retrospective) by edit" in parser.titles
    assert "rewrite_acc at edit 1: 1" in parser.titles and "locality at edit 0: 1" in parser.titles
    independent = tmp_path / "independent.html"
    write_html(independent, summarise(RECORDS, n_boot=100), RECORDS, {"protocol": "independent"})
    assert independent.read_text().count("<svg") == 4


def test_running_mean_averages_the_last_window_points():
    series = {"rewrite_acc": [(0.0, 1.0), (1.0, 0.0), (2.0, 0.0), (3.0, 1.0)]}
    assert running_mean(series, 2)["rewrite_acc"] == [
        (0.0, 1.0),
        (1.0, 0.5),
        (2.0, 0.0),
        (3.0, 0.5),
    ]
    assert running_mean(series, 1) == series


# ---- real tiny models: padding side, batching, generation ----------------------------------


def test_left_and_right_padding_agree(tiny):
    model, tok = tiny
    side = tok.padding_side
    request = EditRequest(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        ground_truth="French",
        rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
        locality=[("Michel Rocard is a native speaker of", "French"), ("A", "B C D E F")],
        portability=[("The capital of Japan is", "Tokyo")],
    )
    right, ref_right = evaluate_request(model, tok, request, padding_side="right")
    left, ref_left = evaluate_request(model, tok, request, padding_side="left")
    assert ref_left == ref_right
    assert left.keys() == right.keys()
    for key, value in right.items():
        assert left[key] == pytest.approx(value, abs=1e-5), key
    pairs = [("The capital of Japan is", "Tokyo"), ("A", "B C D E F G H")]
    batched = score_answers(model, tok, pairs, "left")
    for pair, together in zip(pairs, batched, strict=True):
        (alone,) = score_answers(model, tok, [pair])
        assert alone.predicted_ids == together.predicted_ids
        assert alone.token_logprobs == pytest.approx(together.token_logprobs, abs=1e-5)
    assert tok.padding_side == side  # the shared tokenizer is left as it was


def test_generation_batched_equals_single_and_is_seeded(tiny):
    model, tok = tiny
    prompts = ["The capital of", "Rome is in Italy and the"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    assert batched == [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    state = torch.get_rng_state()
    first = generate(model, tok, prompts[:1], 8, seed=7, sample=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tok, prompts[:1], 8, seed=7, sample=True) == first
    request = EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Tokyo")
    metrics, _ = evaluate_request(model, tok, request, fluency=True, max_new_tokens=8)
    expected = n_gram_entropy(generate(model, tok, [request.text], 8))
    assert metrics["fluency"] == pytest.approx(expected)


# ---- SmolLM2 on CounterFact -----------------------------------------------------------------


def counterfact_requests(n: int) -> list[EditRequest]:
    requests = []
    for row in json.loads(COUNTERFACT.read_text(encoding="utf-8"))[:n]:
        requests.append(
            EditRequest(
                prompt=row["prompt"].replace(row["subject"], "{}", 1),
                subject=row["subject"],
                target_new=row["target_new"],
                ground_truth=row["ground_truth"],
                rephrase_prompts=[row["rephrase_prompt"]],
                locality=[(row["locality_prompt"], row["locality_ground_truth"])],
                case_id=row["case_id"],
                source=f"{COUNTERFACT.name}:{row['case_id']}",
            )
        )
    return requests


@pytest.mark.slow
@pytest.mark.skipif(not COUNTERFACT.exists(), reason="CounterFact data not on this machine")
def test_smollm2_unedited_counterfact():
    from rrome_cli.models.loading import load_model

    loaded = load_model(None)
    requests = counterfact_requests(20)
    start = time.perf_counter()
    results = [evaluate_request(loaded.model, loaded.tok, r) for r in requests]
    per_request = (time.perf_counter() - start) / len(requests)
    rewrite = [m["rewrite_acc"] for m, _ in results]
    es = [m["es"] for m, _ in results]
    print(
        f"\nSmolLM2 unedited, {len(requests)} CounterFact requests: "
        f"rewrite_acc {sum(rewrite) / len(rewrite):.3f}, ES {sum(es) / len(es):.3f}, "
        f"{per_request * 1000:.0f} ms/request"
    )
    assert sum(rewrite) / len(rewrite) < 0.3
    assert all(m["locality"] == 1.0 for m, _ in results)
    # the model is unchanged, so scoring against its own reference must agree exactly
    again, _ = evaluate_request(loaded.model, loaded.tok, requests[0], results[0][1])
    assert again["locality"] == 1.0
