"""Atomic writes that leave what they write as readable as any file the user makes.

safetensors writes its files with mode 0600 and ``tempfile`` makes 0600 files and 0700
directories; renamed into place, they would shut an edited checkpoint, a patch file or the
statistics cache away from the user's group (a teammate, a serving process under another uid).
Each file or folder is therefore first created the plain way (``os.open`` with 0666, ``mkdir``
with 0777), so that the kernel applies the umask, and the mode it got is put back after the
writer has narrowed it. The process-wide umask is never changed, not even for a moment: another
thread creating a file meanwhile would get a world-writable one.

The run directory's layout is here too, with its writers: the report (one JSON line per request,
flushed as it goes), run.json and summary.json (replaced atomically). Patch files and the patch
journal: ``rrome_cli.patches``; an edited checkpoint: ``models.loading.save_model_atomic``.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file


def cache_dir() -> Path:
    """Where rrome keeps converted models and statistics (``$RROME_CACHE`` wins)."""
    if os.environ.get("RROME_CACHE"):
        return Path(os.environ["RROME_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rrome"


def make_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` with the mode ``mkdir`` gives (0777 less
    the umask), where ``tempfile.mkdtemp`` would give 0700."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: cannot make a new directory named {prefix}...")


def _new_file(parent: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new, uniquely named empty file in ``parent`` and the mode ``open()`` gave it."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return path, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{parent}: cannot make a new file named {prefix}...{suffix}")


def publish(directory: Path) -> None:
    """Give everything under ``directory`` (made by :func:`make_dir`) the mode it would have had
    if created directly: the directory's own mode for folders, less the execute bits for files
    (both are 0777 / 0666 less the same umask)."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(mode if path.is_dir() else mode & 0o666)


def save_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write to a uniquely named file beside ``path``, then rename: readers (and a concurrent
    writer of the same file) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.chmod(mode)  # safetensors narrows it to 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# The run directory. What a run (or ``rrome eval``) writes into it: a new run never writes into
# a directory holding any of these (it would mix two runs in one report, or replace, deleting,
# what is there); a non-empty report.jsonl counts too.
PATCH_JOURNAL = "patches.d"  # one file per applied edit while a run goes (rrome_cli.patches)
RUN_FILES = (
    "run.json",
    "summary.json",
    "patches.safetensors",
    PATCH_JOURNAL,
    "model",
    "templates.json",
    "retrospective.jsonl",
)


def new_run_dir(out: Path | None) -> Path:
    """``out``, or a new ``runs/<timestamp>`` (``-2``, ``-3``, ... when that one is taken: two
    runs started in the same second must not share a directory)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: too many runs started in this second")


def held_run_files(out: Path) -> list[str]:
    """Which of a run's files ``out`` holds already."""
    report = out / "report.jsonl"
    held = ["report.jsonl"] if report.is_file() and report.stat().st_size else []
    return held + [name for name in RUN_FILES if (out / name).exists()]


def refuse_finished_run(out: Path | None, resumable: bool = True) -> None:
    """A new run (or evaluation) writes only into a new or empty-of-runs directory: raise if
    ``out`` already holds a run's files. ``resumable``: the message offers ``--resume``."""
    if out is None or not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a directory")
    held = held_run_files(out)
    if held:
        how = "choose another --out"
        if resumable and (out / "run.json").exists():
            how = f"continue it with --resume {out}, or {how}"
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}): {how}")


def done_records(report: Path) -> list[dict[str, Any]]:
    """Records of a previous (interrupted) run; a torn last line is dropped."""
    if not report.exists():
        return []
    records = []
    for line in report.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def append_record(report: IO[str], record: dict[str, Any], stdout: IO[str] | None) -> None:
    """One report line, flushed (an interrupted run keeps every line written), and echoed to
    ``stdout`` when given (``--report -``)."""
    line = json.dumps(record, default=str) + "\n"
    report.write(line)
    report.flush()
    if stdout is not None:
        stdout.write(line)
        stdout.flush()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    tmp.replace(path)


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # running from a source tree, or an optional package
        return "not installed"
