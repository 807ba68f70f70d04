"""Group CounterFact's prompt templates by relation: the table behind ``--phrasings``.

    python docs/experiments/relation_phrasings.py \
        [--source ../shared/data/counterfact/counterfact-train.json]
        [--out data/counterfact-phrasings.json]

The EasyEdit layout has no relation ids, but each record's locality prompt asks the same
relation of another subject. So a record links its own template ("The mother tongue of {} is")
to the template its locality prompt fills ("{} is a native speaker of"), and the connected
groups are the relations. Templates with five characters or fewer around the subject ("{}, in",
"{} is a") fit prompts of several relations and are left out, or they would join them.

Mined from the *train* split only: the benchmark edits records of the disjoint edit split.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
GENERIC = 6  # a template with this many characters or fewer around "{}" links nothing


def template_of(prompt: str, subject: str) -> str | None:
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else None


def filled_by(text: str, templates: dict[str, tuple[str, str]]) -> str | None:
    """The template that ``text`` fills with some subject; the longest fixed text wins."""
    fits = [
        t
        for t, (head, tail) in templates.items()
        if text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail)
    ]
    return max(fits, key=len, default=None)


def relation_groups(records: list[dict]) -> list[list[str]]:
    counts = Counter(template_of(r["prompt"], r["subject"]) for r in records)
    counts.pop(None, None)
    parts = {t: tuple(t.split("{}")) for t in counts}
    specific = {t: p for t, p in parts.items() if len(p[0]) + len(p[1]) > GENERIC}
    parent = {t: t for t in specific}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for r in records:
        own = template_of(r["prompt"], r["subject"])
        other = filled_by(r.get("locality_prompt") or "", parts)
        if own in specific and other in specific:
            parent[root(own)] = root(other)
    groups: dict[str, list[str]] = {}
    for t in sorted(specific, key=lambda t: (-counts[t], t)):  # most used phrasing first
        groups.setdefault(root(t), []).append(t)
    return sorted(groups.values(), key=lambda g: -sum(counts[t] for t in g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=SHARED / "counterfact/counterfact-train.json"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "data/counterfact-phrasings.json")
    args = parser.parse_args()
    groups = relation_groups(json.loads(args.source.read_text()))
    args.out.write_text(json.dumps(groups, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(groups)} relations, {sum(map(len, groups))} templates -> {args.out}")


if __name__ == "__main__":
    main()
