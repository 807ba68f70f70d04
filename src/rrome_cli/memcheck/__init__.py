"""``rrome memcheck``: will an edit fit, on which device, and what to change if it does not.

Everything is computed from the model's configuration: the model is built on the meta device
(``accelerate.init_empty_weights``), so no weight is read and nothing is allocated.

- Weights: placed by the accelerate device map an edit would use (``device_map``): one device
  holds everything; several devices get a balanced ``infer_auto_device_map``.
- The value step (optimising delta, the largest part of an edit) is *traced*: the engine's own
  ``PackedPass``, ``DeltaSite`` and ``Readout`` and two optimisation steps run on meta tensors
  at the planned batch geometry (a request's own rows when given), and a dispatch mode counts
  the bytes of every tensor alive at each moment (attention as a fused kernel keeps it: q, k,
  v, output, log-sum-exp). Three shallow
  copies of the model (edit layer plus 0-1 layers below and 1-2 above) give, per phase, the
  bytes of the fixed part and of each layer below / above the edited one; the real depth and
  the device of every layer then give the peak per device. Like the engine, the trace computes
  logits only where the loss reads them (one row per target token and the KL row); the bytes
  that full logits (batch x tokens x vocab) would take are reported beside it, not counted.
- Offloaded layers (accelerate "cpu" under a GPU map, "disk") run on the main device: their
  activations count there, and so do the streamed-in weights of every offloaded layer above
  the edited one, which autograd keeps until backward (offloading upper layers does not
  lower the peak). An edited layer that would be offloaded is reported as a problem.
- The rest is closed-form (fp32 unless said): the key second moment C (d_in^2, on the CPU) and
  its Cholesky factor (d_in^2, on W's device, one per edited layer), the factorisation peak
  (a copy of C + lambda I, the factor), the rank-one update (outer product, old W kept for
  revert, W in fp32), the key pass, and the statistics pass (float64 sum, keys of one batch,
  one layer's forward; heads x max_len^2 attention scores only under eager attention, since
  SDPA's fused kernels never materialise them).

``measure_peak`` measures what the model predicts: the peak bytes of live tensors while a
function runs (torch's own accounting, not the process RSS).

Parts: ``trace`` (an edit's batch geometry, the value step traced on meta tensors,
``measure_peak``), ``costs`` (what an edit holds per phase and device), ``planning`` (the plan,
the cheapest fix, ``largest_batch``), ``rendering`` (the tables). Device placement, which
``load_model`` uses too, is ``rrome_cli.models.placement``.
"""

from rrome_cli.memcheck.costs import PhaseCost, edit_working_set, value_step_costs
from rrome_cli.memcheck.planning import (
    BATCH_GROWTH,
    DevicePlan,
    GiB,
    MemoryPlan,
    cuda_reserve,
    gib,
    largest_batch,
    parse_max_memory,
    plan,
)
from rrome_cli.memcheck.rendering import render
from rrome_cli.memcheck.trace import (
    TYPICAL,
    Geometry,
    LiveTensorBytes,
    PromptShape,
    estimate_geometry,
    geometry_for,
    live_tensor_bytes,
    longest_shape,
    measure_peak,
    trace_value_step,
)
from rrome_cli.models.placement import (
    MemcheckError,
    device_map,
    meta_model,
    placement,
    weights_per_device,
)

__all__ = [
    "BATCH_GROWTH",
    "cuda_reserve",
    "device_map",
    "DevicePlan",
    "edit_working_set",
    "estimate_geometry",
    "Geometry",
    "geometry_for",
    "GiB",
    "gib",
    "largest_batch",
    "live_tensor_bytes",
    "LiveTensorBytes",
    "longest_shape",
    "measure_peak",
    "MemcheckError",
    "MemoryPlan",
    "meta_model",
    "parse_max_memory",
    "PhaseCost",
    "placement",
    "plan",
    "PromptShape",
    "render",
    "trace_value_step",
    "TYPICAL",
    "value_step_costs",
    "weights_per_device",
]
