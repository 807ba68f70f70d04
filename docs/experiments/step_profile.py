"""Where a value step's CPU time goes, by op (torch.profiler): 8 requests one at a time against
the same 8 in one batch (``ValueBatch``), each request held for 5 steps (the first pass, which
lays the rows out, then 4; the stop test is off so that every request runs them all).

    OMP_NUM_THREADS=1 python docs/experiments/step_profile.py > profile.txt
"""

import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.edit import Prepared, prepare_layer
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.values import ValueBatch
from rrome_cli.models.loading import load_model
from rrome_cli.requests import read_requests
from rrome_cli.run import RunOptions, prepare_covariances

torch.set_num_threads(1)
loaded = load_model("smollm2-135m")
hp = replace(load_hparams(shipped_hparams("smollm2-135m")), v_stop_prob=1.0, v_num_grad_steps=6)
cov, _ = prepare_covariances(loaded, hp, RunOptions(requests=""))
templates = generate_templates(loaded.model, loaded.tok, hp.context_template_length_params)
reqs = list(read_requests("data/counterfact-sample.jsonl", limit=8))
(layer,) = hp.layers
prepared = prepare_layer(
    loaded.model, loaded.tok, reqs, hp, loaded.names, layer, cov[layer], templates
)


def steps(group: list[Prepared], n: int) -> float:
    """Wall seconds of ``n`` steps after the first pass of ``group`` in one batch."""
    batch = ValueBatch(loaded.model, loaded.names, layer, hp)
    for p in group:
        batch.add(p.value_job(loaded.tok, hp, batch))
    batch.step()  # first pass: layout, prefix cache, blocks below
    t = time.perf_counter()
    for _ in range(n):
        batch.step()
    return time.perf_counter() - t


for name, groups in (("batch 1 x8", [[p] for p in prepared]), ("batch 8", [prepared])):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(steps(g, 4) for g in groups)
    per = wall / 32 * 1000
    print(f"== {name}: {wall:.2f} s for 4 steps of 8 requests ({per:.0f} ms per request-step)")
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40
    )
    print(table)
