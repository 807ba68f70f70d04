"""Edit requests: the record type, and streaming readers for EasyEdit / CounterFact / zsRE files.

A request is normalised so that ``prompt`` holds ``{}`` where the subject goes; everything
downstream (keys, values, evaluation) formats it with the subject and never searches strings.

Files are JSON Lines or one JSON array; both are read record by record, so a file of any size
costs the memory of one record. Every problem is a :class:`RequestError` naming the file, the
1-based line and the field.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonlines

FORMATS = ("auto", "easyedit", "counterfact", "zsre")
RECORD = "<record>"  # the field named by errors about a whole record (bad JSON, not an object)
STDIN_NAME = "<stdin>"
ZSRE_LOC_PREFIX = "nq question: "  # a T5 task tag in zsRE's NQ locality prompts, not question text
_CHUNK = 1 << 16  # characters read at a time from a JSON array file
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class EditRequest:
    prompt: str  # "The mother tongue of {} is": exactly one "{}" where the subject stands
    subject: str  # "Danielle Darrieux"
    target_new: str  # "English": no leading space; tokenised as a continuation
    ground_truth: str | None = None  # "French"
    rephrase_prompts: list[str] = field(default_factory=list)  # full texts, subject included
    locality: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)
    portability: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)
    # other phrasings of the relation, "{} is a native speaker of": the value is optimised on
    # them too (bare, no context), so that it answers the relation, not one wording of it
    phrasings: list[str] = field(default_factory=list)
    case_id: str | int | None = None
    source: str = ""  # "file:line" where the record came from, for messages and reports

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (``replace``: other braces stay as they are)."""
        return self.prompt.replace("{}", self.subject)


class RequestError(ValueError):
    """A bad request file or record: ``FILE:LINE: field 'FIELD': what is wrong``.

    ``line`` is 1-based (for a JSON array, the line where the record starts); ``line`` and
    ``field`` are None for problems with the file as a whole (it cannot be opened).
    """

    def __init__(self, file: str, line: int | None, field: str | None, problem: str) -> None:
        self.file, self.line, self.field, self.problem = file, line, field, problem
        where = file if line is None else f"{file}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")


# ---------------------------------------------------------------------------------------------
# Reading records (line number, decoded JSON value) from JSON Lines or a JSON array, streamed.


@contextmanager
def _open(path: str | Path, name: str) -> Iterator[IO[Any]]:
    """Binary stream of ``path`` (``-``: standard input, left open)."""
    if str(path) == "-":
        yield _stdin()
        return
    try:
        stream = open(path, "rb")  # closed below; jsonlines decodes lines
    except OSError as err:
        raise RequestError(name, None, None, f"cannot read: {err.strerror}") from None
    with stream:
        yield stream


class _CountedLines:
    """Iterates lines and remembers the number of the last one handed out."""

    def __init__(self, lines: Iterable[str | bytes]) -> None:
        self._lines = lines
        self.lineno = 0

    def __iter__(self) -> Iterator[str | bytes]:
        for number, line in enumerate(self._lines, 1):
            self.lineno = number
            yield line


def _jsonl_records(lines: Iterable[str | bytes], name: str) -> Iterator[tuple[int, Any]]:
    """(line, value) per non-blank line; a malformed line gives (line, RequestError)."""
    counted = _CountedLines(lines)
    reader = jsonlines.Reader(counted)
    while True:
        try:
            value = reader.read(allow_none=True, skip_empty=True)
        except EOFError:
            return
        except jsonlines.InvalidLineError as err:
            cause = err.__cause__
            if isinstance(cause, json.JSONDecodeError):
                at_end = cause.pos >= len(cause.doc.rstrip())
                where = "at the end of the line" if at_end else f"column {cause.colno}"
                problem = f"not valid JSON: {cause.msg} ({where})"
            else:
                problem = "not valid UTF-8 text" if "utf-8" in str(err) else str(err)
            yield err.lineno, RequestError(name, err.lineno, RECORD, problem)
            continue
        yield counted.lineno, value


class _ArrayRecords:
    """Values of a top-level JSON array, decoded one at a time from a growing buffer.

    ``buf[pos:]`` is the unread text and ``line`` the line number at ``pos``. The buffer is cut
    at line starts, so the column of a syntax error can be told. A syntax error ends the read:
    past it the text cannot be split into records.
    """

    def __init__(self, head: str | bytes, stream: IO[Any], name: str) -> None:
        self.stream, self.name = stream, name
        self.binary = isinstance(head, bytes)
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.json = json.JSONDecoder()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self._append(head)

    def _append(self, data: str | bytes) -> None:
        if not self.binary:
            self.buf += data
            return
        try:
            self.buf += self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError:
            line = self.line + self.buf.count("\n", self.pos)
            raise RequestError(self.name, line, RECORD, "not valid UTF-8 text") from None

    def _more(self) -> bool:
        """Read at least as much again as is unread (so retries stay few); False at the end."""
        if self.eof:
            return False
        data = self.stream.read(max(_CHUNK, len(self.buf) - self.pos))
        self.eof = not data
        self._append(data)
        return not self.eof

    def _advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to
        if self.pos > _CHUNK:  # drop read text, keeping the current line whole
            cut = self.buf.rfind("\n", 0, self.pos) + 1
            self.buf, self.pos = self.buf[cut:], self.pos - cut

    def _peek(self) -> str:
        """The next non-whitespace character, or "" at the end of the input."""
        while True:
            self._advance(_WHITESPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def _error(self, at: int, problem: str) -> RequestError:
        line = self.line + self.buf.count("\n", self.pos, at)
        return RequestError(self.name, line, RECORD, f"{problem} (the array cannot be read on)")

    def _value(self) -> Any:
        while True:
            try:
                value, end = self.json.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                # An error at the end of the buffer may only mean the record is not all read.
                truncated = err.pos > len(self.buf) - 32 or err.msg.startswith("Unterminated")
                if truncated and self._more():
                    continue
                problem = f"not valid JSON: {err.msg} (column {err.colno})"
                raise self._error(err.pos, problem) from None
            self._advance(end)
            return value

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._peek() != "[":
            raise self._error(self.pos, "expected a JSON array")
        self._advance(self.pos + 1)
        if self._peek() == "]":
            self._advance(self.pos + 1)
        else:
            yield from self._items()
        if self._peek():
            raise self._error(self.pos, "not valid JSON: extra data after the closing ']'")

    def _items(self) -> Iterator[tuple[int, Any]]:
        while True:
            self._peek()
            start = self.line
            yield start, self._value()
            after = self._peek()
            if after == "]":
                self._advance(self.pos + 1)
                return
            if after != ",":
                problem = "missing ']' at the end" if not after else "expected ',' or ']'"
                raise self._error(self.pos, f"not valid JSON: {problem}")
            self._advance(self.pos + 1)


def _records(stream: IO[Any], name: str) -> Iterator[tuple[int, Any]]:
    """Decide JSON Lines or JSON array from the first non-blank character, then stream."""
    head: list[Any] = []
    while line := stream.readline():
        if not head:
            line = line.removeprefix(b"\xef\xbb\xbf" if isinstance(line, bytes) else "\ufeff")
        head.append(line)
        if line.strip():
            break
    if not head or not head[-1].strip():
        return
    first = head[-1].lstrip()[:1]
    if first in ("[", b"["):
        yield from _ArrayRecords(head[0][:0].join(head), stream, name)
    else:
        # chain, not a generator's "yield from": closing that would close the stream (stdin)
        yield from _jsonl_records(itertools.chain(head, stream), name)


# ---------------------------------------------------------------------------------------------
# Turning one JSON object into an EditRequest.


@dataclass
class _Record:
    data: dict[str, Any]
    file: str
    line: int
    target_field: str = "target_new"  # as the format names it, for the warning

    def error(self, field: str, problem: str) -> RequestError:
        return RequestError(self.file, self.line, field, problem)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(value), "?")


def _text(rec: _Record, field: str, value: Any, required: bool = True) -> str | None:
    """A stripped string; None when absent/null/blank and not required."""
    if value is None:
        if required:
            raise rec.error(field, "missing")
        return None
    if not isinstance(value, str):
        raise rec.error(field, f"must be a string, got {_type_name(value)}")
    text = value.strip()
    if not text and required:
        raise rec.error(field, "is empty")
    return text or None


def _texts(rec: _Record, field: str, value: Any) -> list[str]:
    """A string or a list of strings, as a list (absent: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_text(rec, field, value)]
    if not isinstance(value, list):
        raise rec.error(field, f"must be a string or a list of strings, got {_type_name(value)}")
    return [_text(rec, f"{field}[{i}]", item) for i, item in enumerate(value)]


def _answer(rec: _Record, field: str, value: Any) -> str:
    """One answer: a string, or a list of aliases of which the first is used."""
    if isinstance(value, list):
        if not value:
            raise rec.error(field, "is an empty list")
        return _answer(rec, f"{field}[0]", value[0])
    return _text(rec, field, value)


def _answers(rec: _Record, field: str, value: Any, count: int) -> list[str]:
    """``count`` answers: one answer (``count`` 1) or a list of ``count`` answers."""
    if count == 1:
        return [_answer(rec, field, value)]
    if not isinstance(value, list):
        raise rec.error(field, f"must be a list of {count} answers, got {_type_name(value)}")
    if len(value) != count:
        raise rec.error(field, f"has {len(value)} answers for {count} prompts")
    return [_answer(rec, f"{field}[{i}]", item) for i, item in enumerate(value)]


def _pairs(rec: _Record, field: str, value: Any) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from EasyEdit's forms: ``{prompt, ground_truth}``, a list of
    those, or a mapping of names (``{"neighborhood": {...}}``) to either."""
    if value is None:
        return []
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _pairs(rec, f"{field}[{i}]", item)]
    if not isinstance(value, dict):
        raise rec.error(field, f"must be an object or a list, got {_type_name(value)}")
    if "prompt" not in value:
        return [pair for name, sub in value.items() for pair in _pairs(rec, f"{field}.{name}", sub)]
    prompts = _texts(rec, f"{field}.prompt", value["prompt"])
    if not prompts:
        raise rec.error(f"{field}.prompt", "missing")
    answers = _answers(rec, f"{field}.ground_truth", value.get("ground_truth"), len(prompts))
    return list(zip(prompts, answers, strict=True))


def _template(rec: _Record, prompt_field: str, prompt: str, subject: str) -> str:
    """The prompt with exactly one ``{}`` where the subject stands."""
    slots = prompt.count("{}")
    if slots == 1:
        return prompt
    if slots > 1:
        raise rec.error(prompt_field, f"has {slots} '{{}}' placeholders; use one, for the subject")
    found = prompt.count(subject)
    if found == 0:
        raise rec.error("subject", f"subject {subject!r} not found in prompt {prompt!r}")
    if found > 1:
        raise rec.error(
            "subject",
            f"subject {subject!r} occurs {found} times in prompt {prompt!r}; "
            "write '{}' in the prompt where the subject stands",
        )
    return prompt.replace(subject, "{}")


def _case_id(rec: _Record, value: Any) -> str | int | None:
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    raise rec.error("case_id", f"must be a number or a string, got {_type_name(value)}")


def _required(
    rec: _Record, prompt: tuple[str, Any], subject: tuple[str, Any], target: tuple[str, Any]
) -> dict[str, Any]:
    """The three required fields, each given as (its name in the format, raw value), checked
    before any optional one; as EditRequest keyword arguments."""
    prompt_text = _text(rec, *prompt)
    subject_text = _text(rec, *subject)
    target_text = _text(rec, *target)
    rec.target_field = target[0]
    return {
        "prompt": _template(rec, prompt[0], prompt_text, subject_text),
        "subject": subject_text,
        "target_new": target_text,
        "source": f"{rec.file}:{rec.line}",
    }


def _from_easyedit(rec: _Record) -> EditRequest:
    data = rec.data
    required = _required(
        rec,
        ("prompt", data.get("prompt")),
        ("subject", data.get("subject")),
        ("target_new", data.get("target_new")),
    )
    locality_prompts = _texts(rec, "locality_prompt", data.get("locality_prompt"))
    locality = []
    if locality_prompts:
        answers = _answers(
            rec, "locality_ground_truth", data.get("locality_ground_truth"), len(locality_prompts)
        )
        locality = list(zip(locality_prompts, answers, strict=True))
    return EditRequest(
        **required,
        ground_truth=_ground_truth(rec, "ground_truth", data.get("ground_truth")),
        rephrase_prompts=_texts(rec, "rephrase_prompt", data.get("rephrase_prompt")),
        locality=locality + _pairs(rec, "locality", data.get("locality")),
        portability=_pairs(rec, "portability", data.get("portability")),
        phrasings=_phrasings(rec, data.get("phrasings")),
        case_id=_case_id(rec, data.get("case_id")),
    )


def _phrasings(rec: _Record, value: Any) -> list[str]:
    """Templates with one ``{}`` for the subject."""
    texts = _texts(rec, "phrasings", value)
    for i, text in enumerate(texts):
        if not _one_slot(text):
            raise rec.error(f"phrasings[{i}]", f"needs one '{{}}' for the subject: {text!r}")
    return texts


def _one_slot(phrasing: str) -> bool:
    """A relation phrasing has exactly one ``{}``, where the subject goes."""
    return phrasing.count("{}") == 1


def _ground_truth(rec: _Record, field: str, value: Any) -> str | None:
    """Optional; a list (zsRE's ``answers``, aliases) gives its first item."""
    if value is None or value == [] or value == "":
        return None
    return _answer(rec, field, value)


def _nested(rec: _Record, data: dict[str, Any], path: str) -> Any:
    """``data["a"]["b"]`` for path "a.b"; None when a part is absent."""
    value: Any = data
    walked = []
    for key in path.split("."):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise rec.error(".".join(walked), f"must be an object, got {_type_name(value)}")
        value = value.get(key)
        walked.append(key)
    return value


def _from_rome_counterfact(rec: _Record) -> EditRequest:
    """ROME's own layout: ``requested_rewrite`` plus paraphrase / neighborhood prompts, whose
    expected answer is the true object (``target_true``)."""
    data = rec.data
    required = _required(
        rec,
        *(
            (p, _nested(rec, data, p))
            for p in (
                "requested_rewrite.prompt",
                "requested_rewrite.subject",
                "requested_rewrite.target_new.str",
            )
        ),
    )
    truth = _text(
        rec,
        "requested_rewrite.target_true.str",
        _nested(rec, data, "requested_rewrite.target_true.str"),
        required=False,
    )
    locality = []
    for i, item in enumerate(_list(rec, "neighborhood_prompts", data.get("neighborhood_prompts"))):
        where = f"neighborhood_prompts[{i}]"
        if isinstance(item, dict):  # ROME's zsRE layout: {prompt, target}
            locality.append(
                (
                    _text(rec, f"{where}.prompt", item.get("prompt")),
                    _text(rec, f"{where}.target", item.get("target")),
                )
            )
        elif truth is None:
            raise rec.error("requested_rewrite.target_true", "missing (needed by neighborhood)")
        else:
            locality.append((_text(rec, where, item), truth))
    return EditRequest(
        **required,
        ground_truth=truth,
        rephrase_prompts=_texts(rec, "paraphrase_prompts", data.get("paraphrase_prompts")),
        locality=locality,
        case_id=_case_id(rec, data.get("case_id")),
    )


def _list(rec: _Record, field: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise rec.error(field, f"must be a list, got {_type_name(value)}")
    return value


def _from_counterfact(rec: _Record) -> EditRequest:
    if "requested_rewrite" in rec.data:
        return _from_rome_counterfact(rec)
    return _from_easyedit(rec)


def _from_zsre(rec: _Record) -> EditRequest:
    """zsRE (MEND split): src, alt, answers, rephrase, loc, loc_ans, subject. The locality
    prompt loses its "nq question: " tag so that it reads as a plain question."""
    data = rec.data
    required = _required(
        rec, ("src", data.get("src")), ("subject", data.get("subject")), ("alt", data.get("alt"))
    )
    loc = _text(rec, "loc", data.get("loc"), required=False)
    locality = []
    if loc is not None:
        loc = loc.removeprefix(ZSRE_LOC_PREFIX).strip()
        locality = [(loc, _answer(rec, "loc_ans", data.get("loc_ans")))]
    rephrase = _text(rec, "rephrase", data.get("rephrase"), required=False)
    return EditRequest(
        **required,
        ground_truth=_ground_truth(rec, "answers", data.get("answers")),
        rephrase_prompts=[rephrase] if rephrase else [],
        locality=locality,
        case_id=_case_id(rec, data.get("case_id")),
    )


_PARSERS: dict[str, Callable[[_Record], EditRequest]] = {
    "easyedit": _from_easyedit,
    "counterfact": _from_counterfact,
    "zsre": _from_zsre,
}


def _detect(rec: _Record) -> str:
    keys = rec.data.keys()
    if "requested_rewrite" in keys or ("case_id" in keys and "prompt" in keys):
        return "counterfact"
    if "src" in keys and "alt" in keys:
        return "zsre"
    if "prompt" in keys:
        return "easyedit"
    shown = ", ".join(sorted(keys)[:8]) or "none"
    raise rec.error(
        RECORD,
        f"cannot tell the format from its keys ({shown}): expected 'prompt' (EasyEdit), "
        "'requested_rewrite' (CounterFact) or 'src' and 'alt' (zsRE); or pass the format",
    )


def read_requests(
    path: str | Path,
    fmt: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    on_skip: Callable[[RequestError], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[EditRequest]:
    """Edit requests from a JSON Lines or JSON array file (``-``: standard input), streamed.

    ``fmt`` is one of :data:`FORMATS`; ``auto`` decides from the first object's keys. A bad
    record raises :class:`RequestError`, or with ``skip_invalid`` is passed to ``on_skip`` (by
    default to ``warn``) and skipped; a JSON syntax error inside an array always raises, as the
    rest cannot be split into records. ``warn`` (default: :func:`warnings.warn`) gets notes
    that do not stop the read, such as a target equal to the ground truth. ``limit`` stops
    after that many valid requests. An input without a valid request raises (``no requests in
    FILE``): a pipeline whose filter matched nothing must not pass as a run that did its work.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown request format {fmt!r}; choose from {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    skip = on_skip or (lambda err: warn(f"skipped: {err}"))
    name = STDIN_NAME if str(path) == "-" else str(path)
    parser = _PARSERS.get(fmt)
    count = skipped = 0
    if limit == 0:
        return
    with _open(path, name) as stream:
        for line, value in _records(stream, name):
            try:
                record = _as_record(value, name, line)
                parser = parser or _PARSERS[_detect(record)]
                request = parser(record)
            except RequestError as err:
                if not skip_invalid:
                    raise
                skip(err)
                skipped += 1
                continue
            if request.ground_truth is not None and request.target_new == request.ground_truth:
                warn(
                    f"{request.source}: field '{record.target_field}': {request.target_new!r} "
                    "equals the ground truth; the edit asks for what the model already says"
                )
            yield request
            count += 1
            if limit is not None and count >= limit:
                return
    if not count:
        valid = f" valid ({skipped} skipped)" if skipped else ""
        raise RequestError(name, None, None, f"no{valid} requests in {name}")


def check_requests(
    path: str | Path, fmt: str = "auto", skip_invalid: bool = False, limit: int | None = None
) -> int:
    """Read a request file whole, before anything costly (loading the model): a bad record
    raises with its file, line and field, an input without requests raises; returns how many
    requests a run will get. With ``skip_invalid`` bad records are passed over in silence: the
    run reports each at its turn. Standard input cannot be read twice: see
    :func:`stdin_is_empty`."""
    found = read_requests(
        path,
        fmt=fmt,
        skip_invalid=skip_invalid,
        limit=limit,
        on_skip=lambda err: None,
        warn=lambda message: None,
    )
    return sum(1 for _ in found)


def stdin_is_empty() -> bool:
    """Whether standard input ends with nothing but blank lines. The lines read to find out
    are given again, first, to whoever reads standard input next (the run streams it)."""
    global _replayed
    stream = _stdin()
    head: list[Any] = []
    while line := stream.readline():
        head.append(line)
        if line.strip():
            break
    _replayed = _Replayed(head, getattr(stream, "stream", stream))
    return not any(line.strip() for line in head)


_replayed: _Replayed | None = None


def _stdin() -> IO[Any]:
    """Standard input as bytes (text where tests replace it), with lines read ahead first."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)  # text when tests replace stdin
    if _replayed is not None and _replayed.stream is stream:
        return _replayed  # type: ignore[return-value]
    return stream


class _Replayed:
    """``head``, lines already read from ``stream``, then the rest of ``stream``."""

    def __init__(self, head: list[Any], stream: IO[Any]) -> None:
        self._head, self.stream = head, stream

    def readline(self) -> Any:
        return self._head.pop(0) if self._head else self.stream.readline()

    def read(self, size: int = -1) -> Any:
        return self._head.pop(0) if self._head else self.stream.read(size)

    def __iter__(self) -> Iterator[Any]:
        while line := self.readline():
            yield line


def _as_record(value: Any, name: str, line: int) -> _Record:
    if isinstance(value, RequestError):  # a line that is not JSON
        raise value
    if not isinstance(value, dict):
        raise RequestError(name, line, RECORD, f"must be a JSON object, got {_type_name(value)}")
    return _Record(value, name, line)


def request_to_dict(req: EditRequest) -> dict[str, Any]:
    """The request under EasyEdit's field names (prompt with the subject filled in), for
    reports; :func:`read_requests` reads it back (format ``easyedit``)."""
    return {
        "case_id": req.case_id,
        "prompt": req.text,
        "subject": req.subject,
        "target_new": req.target_new,
        "ground_truth": req.ground_truth,
        "rephrase_prompt": list(req.rephrase_prompts),
        "locality_prompt": [prompt for prompt, _ in req.locality],
        "locality_ground_truth": [answer for _, answer in req.locality],
        "portability": [{"prompt": p, "ground_truth": a} for p, a in req.portability],
        "phrasings": list(req.phrasings),
        "source": req.source,
    }


# ---------------------------------------------------------------------------------------------
# Relation phrasings (``--phrasings``): a JSON list of groups, each the templates of one relation.


def read_json_file(path: str | Path) -> Any:
    """A whole JSON file (a table, a templates list); a RequestError names the file, and the
    line where the JSON breaks."""
    name = str(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise RequestError(name, None, None, f"cannot read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RequestError(name, err.lineno, None, f"not valid JSON: {err.msg}") from None


def read_phrasings(path: str | Path) -> dict[str, list[str]]:
    """template -> the other templates of its group, in the file's order."""
    name, groups = str(path), read_json_file(path)
    ok = isinstance(groups, list) and all(
        isinstance(g, list) and all(isinstance(t, str) and _one_slot(t) for t in g) for g in groups
    )
    if not ok:
        raise RequestError(name, None, None, "expected a list of lists of templates with one '{}'")
    return {t: [o for o in g if o != t] for g in groups for t in g}


def with_phrasings(request: EditRequest, table: dict[str, list[str]]) -> EditRequest:
    """The request with its relation's other phrasings, unless it brings its own."""
    if request.phrasings or request.prompt not in table:
        return request
    return dataclasses.replace(request, phrasings=list(table[request.prompt]))
