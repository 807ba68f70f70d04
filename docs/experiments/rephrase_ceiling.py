"""Two reference points for issue 7's rephrase target (>= 0.6) on SmolLM2 and CounterFact.

Ran on an older rrome: the oracle sets ``v_stop: every``, removed after commit 8900851
(``git checkout 8900851`` to run it as it ran; ``--extra inserts`` runs on the current code).

1. ``natural``: the unedited model's own transfer. Of the records whose prompt it answers with
   the true object (teacher-forced token accuracy 1), how many rephrased prompts yield that
   object too? A model that does not carry its own true facts over to these rephrasings can
   hardly be asked to carry a new one over more often.
2. ``oracle``: an edit whose value is optimised on the shipped prompts *and on the rephrased
   prompt itself* (the test prompt leaks: a diagnostic, never a recipe), with the shipped layer,
   key and left vector, until every prompt reaches v_stop_prob. Its rephrase accuracy bounds what
   any value at the subject's last token can do for these prompts through this rank-one update.
3. ``--extra inserts``: a data-free try at the same, with the shipped hyperparameters: the value
   is also optimised on the bare prompt with words inserted after the subject ("The mother
   tongue of Danielle Darrieux, as is well known, is"), so that it must survive other words
   between the subject and the question. No test prompt is used.

    python docs/experiments/rephrase_ceiling.py [--n 30] [--natural 500] [--steps 80] \
        [--extra inserts]

Prints one JSON object and appends it to ``bench/results/rephrase-ceiling.jsonl``; per-record
rows go to ``runs/rephrase-ceiling/{oracle,inserts}-records.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))

from key_transfer import located, rephrased  # noqa: E402
from transformers import PreTrainedTokenizerBase  # noqa: E402

from bench import edit_inputs  # noqa: E402
from rrome_cli.config import HParams, load_hparams, shipped_hparams  # noqa: E402
from rrome_cli.engine.keys import Templated, keys_at, templated  # noqa: E402
from rrome_cli.engine.update import (  # noqa: E402
    KeyCovariance,
    Patch,
    apply_patch,
    left_vector,
    restore_weight,
    right_vector,
)
from rrome_cli.engine.values import ValueResult, ValueSpec, kl_prompt, optimise_delta  # noqa: E402
from rrome_cli.evaluate.metrics import evaluate_request  # noqa: E402
from rrome_cli.evaluate.tokens import score_answers  # noqa: E402
from rrome_cli.models.loading import LoadedModel, load_model  # noqa: E402
from rrome_cli.requests import EditRequest, read_requests  # noqa: E402


def natural_transfer(lm: LoadedModel, requests: list[EditRequest]) -> dict[str, float]:
    """Rephrase accuracy of the *true* object, over records whose prompt yields it."""
    pairs = [(r.text, r.ground_truth) for r in requests]
    pairs += [(r.rephrase_prompts[0], r.ground_truth) for r in requests]
    scores = score_answers(lm.model, lm.tok, pairs)
    prompt, rephrase = scores[: len(requests)], scores[len(requests) :]
    known = [i for i, s in enumerate(prompt) if s.accuracy == 1.0]
    return {
        "n": len(requests),
        "prompt_true_acc": statistics.mean(s.accuracy for s in prompt),
        "rephrase_true_acc": statistics.mean(s.accuracy for s in rephrase),
        "n_known": len(known),
        "rephrase_true_acc_given_known": statistics.mean(rephrase[i].accuracy for i in known),
    }


INSERTS = (", as is well known,", " (see above)", ", in fact,", ", according to most sources,")


def inserted(tok: PreTrainedTokenizerBase, request: EditRequest) -> list[Templated]:
    """The bare prompt with each of INSERTS after the subject, the subject located."""
    texts = [request.prompt.replace("{}", request.subject + words) for words in INSERTS]
    return located(tok, texts, request.subject)


def oracle_patch(
    lm: LoadedModel,
    hp: HParams,
    request: EditRequest,
    cov: KeyCovariance,
    templates: list[str],
    extra: str = "rephrase",
) -> tuple[Patch, ValueResult]:
    """The shipped key and u; the value optimised with the ``extra`` prompts among the prompts:
    the rephrased prompt (the oracle) or the inserts."""
    layer = hp.layers[0]
    prompts = [templated(lm.tok, request, t) for t in templates]  # prompts[0]: bare
    prompts += (rephrased if extra == "rephrase" else inserted)(lm.tok, request)
    kl = kl_prompt(lm.tok, request.subject)
    keys = keys_at(lm.model, lm.tok, lm.names, layer, [*prompts, kl])  # (n + 1, d_in)
    k_star = keys[: len(templates)].mean(0)  # the templates' mean, as shipped
    u, _ = left_vector(cov, k_star)
    row_scale = (keys @ u) / (k_star @ u)  # what the update will add at each row
    spec = ValueSpec(prompts, request.target_new, request.subject, row_scale=row_scale)
    value = optimise_delta(lm.model, lm.tok, lm.names, layer, hp, spec)
    right = right_vector(value.delta, k_star, u)
    module = lm.names.rewrite(layer)
    dtype = str(lm.model.get_submodule(module).weight.dtype)
    return Patch(layer, module, u, right, dtype, request=f"{extra}:{request.case_id}"), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="records edited by the oracle")
    parser.add_argument("--natural", type=int, default=500, help="records for natural transfer")
    parser.add_argument("--steps", type=int, default=80, help="oracle's step cap")
    parser.add_argument("--clamp", type=float, default=None, help="oracle's clamp_norm_factor")
    parser.add_argument(
        "--extra", choices=("rephrase", "inserts"), default="rephrase",
        help="rephrase: the oracle; inserts: shipped hparams + words after the subject",
    )  # fmt: skip
    args = parser.parse_args()
    lm = load_model()
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    source = SHARED / "counterfact" / "counterfact-edit.json"
    requests = list(read_requests(source, skip_invalid=True, limit=max(args.n, args.natural)))
    result: dict = {"date": datetime.now().isoformat(timespec="seconds"), "source": str(source)}
    if args.natural:
        result["natural"] = natural_transfer(lm, requests[: args.natural])
        print(json.dumps(result["natural"]), flush=True)

    changes: dict = {}
    if args.extra == "rephrase":
        changes = {"v_stop": "every", "v_num_grad_steps": args.steps}
        changes["clamp_norm_factor"] = args.clamp or hp.clamp_norm_factor
    edit_hp = HParams(**(hp.to_dict() | changes))
    covariances, templates = edit_inputs(lm, hp)
    cov = covariances[hp.layers[0]]
    name = "oracle" if args.extra == "rephrase" else "inserts"
    out_dir = ROOT / "runs" / "rephrase-ceiling"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out_dir / f"{name}-records.jsonl").open("w") as f:
        for request in requests[: args.n]:
            _, reference = evaluate_request(lm.model, lm.tok, request)
            patch, value = oracle_patch(lm, edit_hp, request, cov, templates, args.extra)
            original = apply_patch(lm.model, patch)
            post, _ = evaluate_request(lm.model, lm.tok, request, reference)
            restore_weight(lm.model.get_submodule(patch.module), original)
            row = {"case_id": request.case_id, "steps": value.steps, **post}
            row["delta_ratio"] = float(value.delta.norm() / value.z.norm())
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
    result[name] = {
        "n": len(rows),
        "hparams": changes | {"v_lr": edit_hp.v_lr},
        **{
            m: statistics.mean(r[m] for r in rows)
            for m in ("rewrite_acc", "rephrase_acc", "locality", "es", "ps")
        },
        "steps_median": statistics.median(r["steps"] for r in rows),
        "rephrase_below_1": sum(r["rephrase_acc"] < 1 for r in rows),
        "delta_ratio_median": statistics.median(r["delta_ratio"] for r in rows),
    }
    print(json.dumps(result), flush=True)
    with (ROOT / "bench" / "results" / "rephrase-ceiling.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
