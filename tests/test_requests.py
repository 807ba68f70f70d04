"""Reading edit requests: formats, streaming, and errors that name file, line and field."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rrome_cli import requests as requests_module
from rrome_cli.requests import (
    EditRequest,
    RequestError,
    read_phrasings,
    read_requests,
    request_to_dict,
    with_phrasings,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT = SHARED / "counterfact" / "counterfact-edit.json"
ZSRE = SHARED / "zsre" / "zsre_mend_train-1k.json"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared data not on this machine")

GOOD = {
    "prompt": "The capital of France is",
    "subject": "France",
    "target_new": "Lyon",
    "ground_truth": "Paris",
}


def write_jsonl(tmp_path: Path, *records: Any, name: str = "requests.jsonl") -> Path:
    """One line per record: dicts as JSON, strings verbatim (to write broken lines)."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def first_error(path: Path, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as err:
        list(read_requests(path, warn=lambda note: None, **kwargs))
    return err.value


def assert_names(err: RequestError, path: Path, line: int, field: str) -> None:
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert str(err).startswith(f"{path}:{line}: field '{field}': ")


def test_reads_easyedit_line_and_normalises_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD)
    [req] = read_requests(path)
    assert req.prompt == "The capital of {} is"
    assert req.text == "The capital of France is"
    assert (req.target_new, req.ground_truth, req.source) == ("Lyon", "Paris", f"{path}:1")


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD, '{"prompt": "x", "subject": ', GOOD)
    err = first_error(path)
    assert_names(err, path, 2, "<record>")
    assert "not valid JSON" in str(err)


def test_record_must_be_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD, "42")
    err = first_error(path)
    assert_names(err, path, 2, "<record>")
    assert "JSON object" in str(err)


@pytest.mark.parametrize("missing", ["prompt", "subject", "target_new"])
def test_missing_required_field(tmp_path: Path, missing: str) -> None:
    record = {k: v for k, v in GOOD.items() if k != missing}
    err = first_error(write_jsonl(tmp_path, GOOD, record))
    assert_names(err, tmp_path / "requests.jsonl", 2, missing)
    assert "missing" in str(err)


def test_required_fields_are_checked_first(tmp_path: Path) -> None:
    record = {"prompt": "The capital of France is", "subject": "France", "rephrase_prompt": 5}
    err = first_error(write_jsonl(tmp_path, record))
    assert err.field == "target_new"


@pytest.mark.parametrize("empty", ["prompt", "subject", "target_new"])
def test_empty_required_field(tmp_path: Path, empty: str) -> None:
    err = first_error(write_jsonl(tmp_path, {**GOOD, empty: "  "}))
    assert_names(err, tmp_path / "requests.jsonl", 1, empty)
    assert "empty" in str(err)


def test_subject_not_in_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD, GOOD, {**GOOD, "subject": "Japan"})
    err = first_error(path)
    assert_names(err, path, 3, "subject")
    assert "'Japan' not found in prompt" in str(err)


def test_subject_twice_in_prompt(tmp_path: Path) -> None:
    record = {**GOOD, "prompt": "France borders Spain, and the capital of France is"}
    err = first_error(write_jsonl(tmp_path, record))
    assert_names(err, tmp_path / "requests.jsonl", 1, "subject")
    assert "occurs 2 times in prompt" in str(err)


def test_subject_twice_is_fine_when_prompt_has_placeholder(tmp_path: Path) -> None:
    record = {**GOOD, "prompt": "France borders Spain, and the capital of {} is"}
    [req] = read_requests(write_jsonl(tmp_path, record))
    assert req.prompt == record["prompt"]
    assert req.text == "France borders Spain, and the capital of France is"


def test_two_placeholders_are_an_error(tmp_path: Path) -> None:
    err = first_error(write_jsonl(tmp_path, {**GOOD, "prompt": "{} and {} are"}))
    assert_names(err, tmp_path / "requests.jsonl", 1, "prompt")


def test_text_leaves_other_braces_alone() -> None:
    req = EditRequest(prompt="In {x}, {} is", subject="Paris", target_new="big")
    assert req.text == "In {x}, Paris is"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("prompt", 5, "must be a string"),
        ("target_new", ["Lyon"], "must be a string"),
        ("rephrase_prompt", {"a": 1}, "string or a list of strings"),
        ("case_id", 1.5, "number or a string"),
        ("locality", 3, "object or a list"),
    ],
)
def test_wrong_type(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    err = first_error(write_jsonl(tmp_path, {**GOOD, field: value}))
    assert_names(err, tmp_path / "requests.jsonl", 1, field)
    assert expected in str(err)


def test_wrong_type_inside_list_names_the_item(tmp_path: Path) -> None:
    err = first_error(write_jsonl(tmp_path, {**GOOD, "rephrase_prompt": ["ok", 7]}))
    assert_names(err, tmp_path / "requests.jsonl", 1, "rephrase_prompt[1]")


def test_target_equal_to_ground_truth_warns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD, {**GOOD, "target_new": "Paris"})
    notes: list[str] = []
    requests = list(read_requests(path, warn=notes.append))
    assert len(requests) == 2  # a warning, not an error
    assert len(notes) == 1
    assert f"{path}:2" in notes[0] and "'target_new'" in notes[0] and "ground truth" in notes[0]


def test_default_warning_goes_to_warnings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, {**GOOD, "target_new": "Paris"})
    with pytest.warns(UserWarning, match="equals the ground truth"):
        list(read_requests(path))


def test_skip_invalid_reports_each_bad_record(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        GOOD,
        "{not json",
        {**GOOD, "target_new": ""},
        "",
        {**GOOD, "subject": "X"},
        {**GOOD, "target_new": "Nice"},
    )
    skipped: list[RequestError] = []
    requests = list(read_requests(path, skip_invalid=True, on_skip=skipped.append))
    assert [r.source for r in requests] == [f"{path}:1", f"{path}:6"]  # line 5 is blank
    assert [(e.line, e.field) for e in skipped] == [
        (2, "<record>"),
        (3, "target_new"),
        (5, "subject"),
    ]


def test_skip_invalid_without_callback_warns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD, "[]")  # on line 1, "[" would start a JSON array
    notes: list[str] = []
    assert len(list(read_requests(path, skip_invalid=True, warn=notes.append))) == 1
    assert len(notes) == 1 and f"{path}:2" in notes[0]


def test_limit_counts_valid_requests(tmp_path: Path) -> None:
    records = [{**GOOD, "target_new": f"City{i}"} for i in range(5)]
    path = write_jsonl(tmp_path, records[0], "{bad", *records[1:])
    got = list(read_requests(path, skip_invalid=True, limit=3, on_skip=lambda e: None))
    assert [r.target_new for r in got] == ["City0", "City1", "City2"]
    assert list(read_requests(path, limit=0)) == []
    with pytest.raises(ValueError, match="limit"):
        list(read_requests(path, limit=-1))


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "subject": "Spain"}) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    with pytest.raises(RequestError) as err:
        list(read_requests("-"))
    assert (err.value.file, err.value.line, err.value.field) == ("<stdin>", 3, "subject")


def test_stdin_json_array(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([GOOD, GOOD], indent=2)))
    sources = [r.source for r in read_requests("-")]
    assert sources == ["<stdin>:2", "<stdin>:8"]


def array_text(records: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """A JSON array laid out unevenly, and the line where each record starts."""
    parts, starts, line = ["[\n\n"], [], 3
    for i, record in enumerate(records):
        body = json.dumps(record, indent=i % 3 or None, ensure_ascii=False)
        starts.append(line)
        parts.append(body + (",\n" if i % 2 else " ,  ") if i < len(records) - 1 else body)
        line += parts[-1].count("\n")
    parts.append("\n]\n")
    return "".join(parts), starts


def unicode_records(n: int) -> list[dict[str, Any]]:
    subjects = ["Zürich", "東京", "Łódź", "São Paulo", "Αθήνα"]
    return [
        {
            "case_id": i,
            "prompt": f"{subjects[i % 5]} {{}} is in",
            "subject": subjects[i % 5],
            "target_new": f"Ünïcode {i}",
            "ground_truth": "x",
            "rephrase_prompt": ["a", "b"],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk", [3, 17, 1 << 16])
def test_json_array_lines_and_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Tiny chunks split records, strings and multi-byte characters at every place."""
    monkeypatch.setattr(requests_module, "_CHUNK", chunk)
    records = unicode_records(12)
    text, starts = array_text(records)
    path = tmp_path / "array.json"
    path.write_text(text, encoding="utf-8")
    got = list(read_requests(path))
    assert [r.source for r in got] == [f"{path}:{line}" for line in starts]
    assert [r.text for r in got] == [r["prompt"].replace("{}", r["subject"]) for r in records]
    assert [r.target_new for r in got] == [r["target_new"] for r in records]
    assert [r.case_id for r in got] == list(range(12))


def test_json_array_is_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request comes after reading a small part of a large array."""
    text, _ = array_text(unicode_records(10_000))
    assert len(text) > 16 * requests_module._CHUNK
    stdin = io.StringIO(text)
    monkeypatch.setattr(sys, "stdin", stdin)
    first = next(read_requests("-"))
    assert first.case_id == 0
    assert stdin.tell() <= 2 * requests_module._CHUNK


def test_json_lines_are_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(json.dumps(r) + "\n" for r in unicode_records(3000))
    stdin = io.StringIO(text)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert [r.case_id for r in read_requests("-", limit=2)] == [0, 1]
    assert stdin.tell() < len(text) // 10


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[\n {"prompt": "a b", "subject": "a", "target_new": "c"},\n {"prompt": \n]', 4),
        ('[\n {"prompt": "a b", "subject": "a", "target_new": "c"}\n {"x": 1}\n]', 3),
        ('[\n {"prompt": "a b", "subject": "a", "target_new": "c"},\n', 3),
        ('[\n {"prompt": "a b", "subject": "a", "target_new": "c"}\n] x', 3),
    ],
    ids=["bad value", "missing comma", "missing bracket", "extra data"],
)
def test_json_array_syntax_error_stops_even_when_skipping(
    tmp_path: Path, text: str, line: int
) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    got: list[EditRequest] = []
    with pytest.raises(RequestError) as err:
        got.extend(read_requests(path, skip_invalid=True, on_skip=lambda e: None))
    assert [r.text for r in got] == ["a b"]  # the records before the error are read
    assert_names(err.value, path, line, "<record>")
    assert "not valid JSON" in str(err.value)


def test_json_array_record_errors_name_the_record_start(tmp_path: Path) -> None:
    records = [GOOD, {**GOOD, "target_new": None}, {**GOOD, "target_new": "Nice"}]
    path = tmp_path / "array.json"
    path.write_text(json.dumps(records, indent=4))
    skipped: list[RequestError] = []
    got = list(read_requests(path, skip_invalid=True, on_skip=skipped.append))
    assert [r.source for r in got] == [f"{path}:2", f"{path}:14"]
    assert [(e.line, e.field) for e in skipped] == [(8, "target_new")]


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "Z\xfcrich"}\n')
    assert_names(first_error(path), path, 2, "<record>")


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert [r.subject for r in read_requests(path)] == ["France"]


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    err = first_error(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(err) and "cannot read" in str(err)
    with pytest.raises(ValueError, match="unknown request format"):
        list(read_requests(tmp_path / "nope.jsonl", fmt="csv"))


def test_unknown_layout_names_the_keys(tmp_path: Path) -> None:
    err = first_error(write_jsonl(tmp_path, {"question": "q", "answer": "a"}))
    assert_names(err, tmp_path / "requests.jsonl", 1, "<record>")
    assert "question" in str(err)


def test_easyedit_nested_locality_and_portability(tmp_path: Path) -> None:
    record = {
        **GOOD,
        "rephrase_prompt": ["France's capital is", "The capital city of France is"],
        "locality_prompt": "The capital of Spain is",
        "locality_ground_truth": ["Madrid", "madrid"],
        "locality": {
            "neighborhood": {
                "prompt": ["The capital of Italy is", "Germany's capital:"],
                "ground_truth": ["Rome", ["Berlin", "berlin"]],
            }
        },
        "portability": {
            "reasoning": [{"prompt": "The Louvre's city is", "ground_truth": "Paris"}],
            "alias": {"prompt": "The French capital is", "ground_truth": "Paris"},
        },
    }
    [req] = read_requests(write_jsonl(tmp_path, record), fmt="easyedit")
    assert req.rephrase_prompts == record["rephrase_prompt"]
    assert req.locality == [
        ("The capital of Spain is", "Madrid"),
        ("The capital of Italy is", "Rome"),
        ("Germany's capital:", "Berlin"),
    ]
    assert req.portability == [
        ("The Louvre's city is", "Paris"),
        ("The French capital is", "Paris"),
    ]


def test_locality_answers_must_match_prompts(tmp_path: Path) -> None:
    record = {**GOOD, "locality": {"n": {"prompt": ["a", "b", "c"], "ground_truth": ["x", "y"]}}}
    err = first_error(write_jsonl(tmp_path, record))
    assert_names(err, tmp_path / "requests.jsonl", 1, "locality.n.ground_truth")
    assert "2 answers for 3 prompts" in str(err)


def test_rome_counterfact_layout(tmp_path: Path) -> None:
    record = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Danielle Darrieux spoke"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin spoke"],
    }
    path = write_jsonl(tmp_path, record)
    for fmt in ("counterfact", "auto"):
        [req] = read_requests(path, fmt=fmt)
        assert (req.prompt, req.subject, req.case_id) == (
            "The mother tongue of {} is",
            "Danielle Darrieux",
            7,
        )
        assert (req.target_new, req.ground_truth) == ("English", "French")
        assert req.rephrase_prompts == ["Danielle Darrieux spoke"]
        assert req.locality == [(p, "French") for p in record["neighborhood_prompts"]]
    bad = {**record, "requested_rewrite": {**record["requested_rewrite"], "target_new": "English"}}
    err = first_error(write_jsonl(tmp_path, bad))
    assert_names(err, tmp_path / "requests.jsonl", 1, "requested_rewrite.target_new")


def raw_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` records, decoded independently of the reader under test."""
    decoder, text = json.JSONDecoder(), path.read_text(encoding="utf-8")
    pos, out = text.index("[") + 1, []
    while len(out) < n:
        while text[pos] in " \n\r\t,":
            pos += 1
        record, pos = decoder.raw_decode(text, pos)
        out.append(record)
    return out


@needs_shared
@pytest.mark.parametrize("fmt", ["counterfact", "easyedit", "auto"])
def test_counterfact_file_first_records(fmt: str) -> None:
    expected = raw_records(COUNTERFACT, 5)
    got = list(read_requests(COUNTERFACT, fmt=fmt, limit=5))
    lines = COUNTERFACT.read_text().splitlines()
    for req, raw in zip(got, expected, strict=True):
        assert req.text == raw["prompt"] and req.prompt.count("{}") == 1
        assert (req.subject, req.target_new, req.ground_truth, req.case_id) == (
            raw["subject"],
            raw["target_new"],
            raw["ground_truth"],
            raw["case_id"],
        )
        assert req.rephrase_prompts == [raw["rephrase_prompt"]]
        assert req.locality == [(raw["locality_prompt"], raw["locality_ground_truth"])]
        line = int(req.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"  # the record starts there
        assert f'"case_id": {raw["case_id"]},' in lines[line]


@needs_shared
@pytest.mark.parametrize("fmt", ["zsre", "auto"])
def test_zsre_file_first_records(fmt: str) -> None:
    expected = raw_records(ZSRE, 5)
    got = list(read_requests(ZSRE, fmt=fmt, limit=5))
    for req, raw in zip(got, expected, strict=True):
        assert req.text == raw["src"]
        assert (req.subject, req.target_new, req.ground_truth) == (
            raw["subject"],
            raw["alt"],
            raw["answers"][0],
        )
        assert req.rephrase_prompts == [raw["rephrase"]]
        [(loc_prompt, loc_answer)] = req.locality
        assert raw["loc"] == "nq question: " + loc_prompt and loc_answer == raw["loc_ans"]
    assert got[0].prompt == "What is the product made by {}?"


@needs_shared
def test_zsre_file_has_two_empty_targets() -> None:
    """The real file holds records with an empty ``alt``: an error, or skipped."""
    err = first_error(ZSRE)
    assert_names(err, ZSRE, 6964, "alt")
    skipped: list[RequestError] = []
    notes: list[str] = []
    got = list(read_requests(ZSRE, skip_invalid=True, on_skip=skipped.append, warn=notes.append))
    raw = json.loads(ZSRE.read_text())
    assert len(got) == len(raw) - 2 and [e.field for e in skipped] == ["alt", "alt"]
    same = sum(r["alt"] == r["answers"][0] for r in raw)
    assert len(notes) == same > 0  # one warning per unchanged target, naming zsRE's field
    assert all("field 'alt'" in note for note in notes)


def test_shipped_samples_are_the_first_shared_records() -> None:
    for name, fmt in (("counterfact-sample.jsonl", "counterfact"), ("zsre-sample.jsonl", "zsre")):
        path = ROOT / "data" / name
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 20
        got = list(read_requests(path, fmt=fmt))
        assert [r.source for r in got] == [f"{path}:{i}" for i in range(1, 21)]
        if SHARED.exists():
            shared = COUNTERFACT if fmt == "counterfact" else ZSRE
            assert [json.loads(line) for line in lines] == raw_records(shared, 20)


def test_shipped_bad_requests_example() -> None:
    path = ROOT / "data" / "bad-requests.jsonl"
    skipped: list[RequestError] = []
    notes: list[str] = []
    got = list(read_requests(path, skip_invalid=True, on_skip=skipped.append, warn=notes.append))
    assert [r.source for r in got] == [f"{path}:1", f"{path}:8"]
    assert [(e.line, e.field) for e in skipped] == [
        (2, "<record>"),
        (3, "target_new"),
        (4, "subject"),
        (5, "subject"),
        (6, "target_new"),
        (7, "prompt"),
    ]
    assert len(notes) == 1 and f"{path}:8" in notes[0]


def test_request_to_dict_reads_back(tmp_path: Path) -> None:
    req = EditRequest(
        prompt="The capital of {} is",
        subject="France",
        target_new="Lyon",
        ground_truth="Paris",
        rephrase_prompts=["France's capital is"],
        locality=[("Spain's capital is", "Madrid")],
        portability=[("The Louvre is in", "Paris")],
        phrasings=["{}'s capital is"],
        case_id="c1",
        source="x:1",
    )
    record = request_to_dict(req)
    assert record["prompt"] == "The capital of France is"
    path = write_jsonl(tmp_path, record)
    [back] = read_requests(path, fmt="easyedit")
    assert back.source == f"{path}:1"
    assert {**vars(back), "source": "x:1"} == vars(req)
    # The dict is plain JSON, as a report needs.
    assert json.loads(json.dumps(record)) == record


def test_phrasings_are_templates_with_one_slot(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD | {"phrasings": ["{}'s capital is", "The seat of {} is"]})
    [req] = read_requests(path)
    assert req.phrasings == ["{}'s capital is", "The seat of {} is"]
    bad = write_jsonl(tmp_path, GOOD, GOOD | {"phrasings": ["{}'s capital is", "France's"]})
    assert_names(first_error(bad), bad, 2, "phrasings[1]")


def test_phrasings_table_fills_requests_of_its_relations(tmp_path: Path) -> None:
    table_path = tmp_path / "phrasings.json"
    groups = [["The capital of {} is", "{}'s capital is", "The seat of {} is"], ["{} works as"]]
    table_path.write_text(json.dumps(groups))
    table = read_phrasings(table_path)
    [req] = read_requests(write_jsonl(tmp_path, GOOD))
    assert with_phrasings(req, table).phrasings == ["{}'s capital is", "The seat of {} is"]
    own = EditRequest(**{**vars(req), "phrasings": ["{} has the capital"]})
    assert with_phrasings(own, table).phrasings == ["{} has the capital"]  # its own are kept
    other = EditRequest(**{**vars(req), "prompt": "{} is the capital of"})
    assert with_phrasings(other, table).phrasings == []  # a prompt the table does not know


@pytest.mark.parametrize(
    "text", ['[["{} is"], ["no slot"]]', '{"a": ["{} is"]}', '[["{} is"]', ""], ids=str
)
def test_bad_phrasings_table_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "phrasings.json"
    path.write_text(text)
    with pytest.raises(RequestError, match=str(path)):
        read_phrasings(path)
    with pytest.raises(RequestError, match="cannot read"):
        read_phrasings(tmp_path / "missing.json")


def test_shipped_phrasings_table_reads_and_knows_the_sample() -> None:
    table = read_phrasings(ROOT / "data" / "counterfact-phrasings.json")
    requests = list(read_requests(ROOT / "data" / "counterfact-sample.jsonl"))
    assert sum(r.prompt in table for r in requests) >= 15
    first = with_phrasings(requests[0], table)
    assert "{} is a native speaker of" in first.phrasings
    assert requests[0].prompt not in first.phrasings


def _relation_phrasings():  # noqa: ANN202 - the script that made the shipped table, imported by path
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "relation_phrasings", ROOT / "docs" / "experiments" / "relation_phrasings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relation_groups_link_templates_through_locality_prompts() -> None:
    def record(prompt: str, subject: str, locality: str) -> dict[str, str]:
        return {"prompt": prompt, "subject": subject, "locality_prompt": locality}

    records = [
        record("The mother tongue of Ann Lee is", "Ann Lee", "Bo Kim is a native speaker of"),
        record("Cy Ray is a native speaker of", "Cy Ray", "Di Fox, a native"),
        record("Ed Ho, a native", "Ed Ho", "Fay Wu, in"),  # links to a generic template only
        record("Gus Ma, in", "Gus Ma", "Hal Ng, a native"),
        record("Ivy Orr works as", "Ivy Orr", "Jo Pym works as"),
        record("The capital of Kent is", "Kent", "Lee, in"),
    ]
    groups = _relation_phrasings().relation_groups(records)
    assert sorted(map(sorted, groups)) == [
        ["The capital of {} is"],
        ["The mother tongue of {} is", "{} is a native speaker of", "{}, a native"],
        ["{} works as"],
    ]  # "{}, in" fits prompts of several relations: left out, it joins nothing


@needs_shared
def test_shipped_phrasings_table_is_what_the_script_makes() -> None:
    records = json.loads((SHARED / "counterfact" / "counterfact-train.json").read_text())
    shipped = json.loads((ROOT / "data" / "counterfact-phrasings.json").read_text())
    assert _relation_phrasings().relation_groups(records) == shipped
