"""`lorax verify`: does each adapter compute what it should, on this machine, through every path?

For every adapter (and the base model) a few probe prompts are generated greedily three ways:

- eager: the engine's own kernels, no CUDA graphs;
- graph: the same engine replaying its decode CUDA graphs (CUDA with the Triton backend only);
- reference: the pure-torch reference kernels in fp32 over weights with the adapter *merged in*
  (W + B @ A per module and per expert), scored teacher-forced on the eager continuation.

The reference shares nothing with the LoRA path: no slab, no virtual experts, no shrink/expand. It runs
in fp32 whatever the engine's dtype (merging into 16-bit weights would round W + dW and hide the very
differences this looks for), one decoder layer at a time so that only one layer is ever held in fp32;
the engine's own weight tensors are never written.

Reported per adapter: the largest |logprob| difference of each path against eager over the chosen
token and the engine's top 5 at every position (a wrong delta that leaves the argmax alone still moves
the runners-up), counting tokens with at least 1% probability on either side, and the first token where
a path's greedy choice differs from eager's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lorax.adapters.canonical import CanonicalAdapter
from lorax.inference.engine import LLM
from lorax.inference.types import GenerateRequest, SamplingParams
from lorax.kernels.registry import KernelOps, get_ops

DEFAULT_PROBES = ("The quick brown fox", "def fibonacci(n):", "1, 2, 3, 5, 8,", "abc|")


@dataclass
class PathCheck:
    max_logprob_diff: float | None = None  # vs eager, over the positions compared
    first_divergence: int | None = None  # index of the first generated token that differs from eager
    detail: str = ""


@dataclass
class AdapterCheck:
    adapter: str  # "<base>" for the base model
    graph: PathCheck = field(default_factory=PathCheck)
    reference: PathCheck = field(default_factory=PathCheck)
    ok: bool = True


@dataclass
class VerifyReport:
    device: str
    dtype: str
    backend: str
    tolerance: float
    graphs: bool
    checks: list[AdapterCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def default_tolerance(dtype: torch.dtype) -> float:
    """Max |logprob| difference accepted: fp32 paths agree to rounding; a 16-bit engine differs from the
    fp32 reference by its own rounding."""
    # 16-bit: the base row (no adapter) shows the engine's own rounding floor against fp32; on the demo
    # it is ~0.3 nat at low-confidence positions, while a dropped or mis-packed expert LoRA costs nats.
    return 1e-3 if dtype == torch.float32 else 1.0


@contextmanager
def _swapped_ops(model: torch.nn.Module, ops: KernelOps) -> Iterator[None]:
    """Point every layer at another kernel backend for the duration (layers read `self.ops`)."""
    saved = [(m, m.ops) for m in model.modules() if isinstance(getattr(m, "ops", None), KernelOps)]
    for m, _ in saved:
        m.ops = ops
    try:
        yield
    finally:
        for m, old in saved:
            m.ops = old


def _merge_targets(llm: LLM, adapter: CanonicalAdapter) -> list[tuple[torch.Tensor, slice | int | None, torch.Tensor]]:
    """(engine weight, row slice or expert index, delta) for every delta of the adapter."""
    cfg = llm.model_config
    q, kv = cfg.q_size, cfg.kv_size
    rows = {
        "self_attn.q_proj": ("attn.qkv", slice(0, q)),
        "self_attn.k_proj": ("attn.qkv", slice(q, q + kv)),
        "self_attn.v_proj": ("attn.qkv", slice(q + kv, q + 2 * kv)),
        "self_attn.o_proj": ("attn.o", None),
    }
    params = llm.model.named_weights()
    out: list[tuple[torch.Tensor, slice | int | None, torch.Tensor]] = []
    for (layer, module), pair in adapter.dense.items():
        if module in rows:
            name, sl = rows[module]
        else:  # mlp.{gate,up,down}_proj or mlp.shared_expert.{gate,up,down}_proj
            prefix = "mlp.shared" if ".shared_expert." in module else "mlp"
            proj = module.rsplit(".", 1)[1]
            weight = params[f"layers.{layer}.{prefix}.gate_up.weight"]
            inter = weight.shape[0] // 2
            name, sl = {
                "gate_proj": (f"{prefix}.gate_up", slice(0, inter)),
                "up_proj": (f"{prefix}.gate_up", slice(inter, 2 * inter)),
                "down_proj": (f"{prefix}.down", None),
            }[proj]
        out.append((params[f"layers.{layer}.{name}.weight"], sl, pair.delta()))
    for layer, moe in adapter.moe.items():
        w13, w2 = params[f"layers.{layer}.mlp.w13"], params[f"layers.{layer}.mlp.w2"]
        for e in range(moe.num_experts):
            gate, up, down = moe.expert_deltas(e)
            out.append((w13, e, torch.cat([gate, up])))
            out.append((w2, e, down))
    return out


@contextmanager
def _fp32_reference(llm: LLM, adapter: CanonicalAdapter | None) -> Iterator[None]:
    """Run the model in fp32 with the adapter's deltas merged, one decoder layer at a time.

    Each layer's parameters are swapped for fp32 copies with the deltas added just before the layer
    runs and swapped back right after, so at most one layer is held in fp32 and the engine's own
    tensors are never written (no rounding of W + dW to 16 bits, nothing to restore).
    """
    model = llm.model
    pending: dict[int, list[tuple[slice | int | None, torch.Tensor]]] = {}
    for weight, where, delta in _merge_targets(llm, adapter) if adapter is not None else []:
        pending.setdefault(id(weight), []).append((where, delta))

    def upcast(module: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        saved = []
        for p in module.parameters():
            full = p.data.float()  # always a copy when p is 16-bit; clone fp32 so merges never touch p
            full = full.clone() if full.data_ptr() == p.data.data_ptr() else full
            for where, delta in pending.get(id(p), []):
                target = full if where is None else full[where]
                target += delta.to(full.device)
            saved.append((p, p.data))
            p.data = full
        return saved

    live: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}

    def before(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        live[id(module)] = upcast(module)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def after(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        for p, data in live.pop(id(module)):
            p.data = data

    hooks = []
    for module in [*model.layers, model.norm]:
        hooks.append(module.register_forward_pre_hook(before))
        hooks.append(module.register_forward_hook(after))
    head = model.lm_head_weight  # the final projection (tied or not) runs outside any hooked module
    head_data = head.data
    head.data = head_data.float()
    try:
        yield
    finally:
        head.data = head_data
        for h in hooks:
            h.remove()
        for saved in live.values():  # a layer that raised mid-forward
            for p, data in saved:
                p.data = data


TOP_N = 5  # logprobs compared at each position: the chosen token and the engine's top 5
PLAUSIBLE = math.log(0.01)  # ...of those, the tokens with >= 1% probability on either side (the far tail
# of a confident model carries large, meaningless relative rounding in 16 bits)


# (generated tokens, per position {token id: logprob} for the chosen token and the top TOP_N)
Probe = tuple[list[int], list[dict[int, float]]]


def _generate(llm: LLM, prompts: list[list[int]], adapter: str | None, n: int, graphs: bool) -> list[Probe]:
    runner = llm.runner
    saved = runner.graphs
    runner.graphs = saved if graphs else None
    try:
        reqs = [
            GenerateRequest(request_id=f"verify-{i}", prompt_token_ids=p, adapter=adapter,
                            sampling=SamplingParams(max_tokens=n, ignore_eos=True, logprobs=TOP_N))
            for i, p in enumerate(prompts)
        ]
        outs = llm.generate(reqs)
    finally:
        runner.graphs = saved
    result: list[Probe] = []
    for o in outs:
        if o.error is not None:
            raise RuntimeError(f"verify: probe failed for adapter {adapter!r}: {o.error}")
        result.append((o.token_ids, [{lp.token_id: lp.logprob, **dict(lp.top)} for lp in o.logprobs or []]))
    return result


def _reference(llm: LLM, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced fp32 logprobs [len(tokens), V] after `prompt`, and the greedy choice at each position."""
    req = GenerateRequest(request_id="verify-ref", prompt_token_ids=prompt + tokens[:-1], adapter=None)
    logits = llm.prompt_logits(req)[len(prompt) - 1 :]  # rows predicting tokens[0..]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs, logprobs.argmax(dim=-1).tolist()


def _diffs(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [abs(a[t] - b[t]) for t in a.keys() & b.keys() if max(a[t], b[t]) >= PLAUSIBLE]


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def verify(
    llm: LLM,
    adapters: dict[str, CanonicalAdapter],
    prompts: list[list[int]],
    max_tokens: int = 16,
    tolerance: float | None = None,
) -> VerifyReport:
    tol = default_tolerance(llm.dtype) if tolerance is None else tolerance
    has_graphs = llm.runner.graphs is not None
    ref_ops = get_ops(llm.device, "torch")
    checks: list[AdapterCheck] = []
    for name in [None, *adapters]:
        check = AdapterCheck(adapter=name or "<base>")
        eager = _generate(llm, prompts, name, max_tokens, graphs=False)
        if has_graphs:
            replay = _generate(llm, prompts, name, max_tokens, graphs=True)
            diffs, first = [], None
            for (et, el), (gt, gl) in zip(eager, replay, strict=True):
                d = _first_diff(et, gt)
                upto = len(et) if d is None else d + 1  # logprobs agree in meaning up to the first split
                for x, y in zip(el[:upto], gl[:upto], strict=True):
                    diffs += _diffs(x, y)
                first = d if first is None else (first if d is None else min(first, d))
            check.graph = PathCheck(max(diffs, default=0.0), first)
        else:
            check.graph = PathCheck(detail="no CUDA graphs on this device/backend")
        diffs, first = [], None
        with _fp32_reference(llm, adapters[name] if name is not None else None), _swapped_ops(llm.model, ref_ops):
            for prompt, (et, el) in zip(prompts, eager, strict=True):
                ref_lp, ref_greedy = _reference(llm, prompt, et)
                for i, x in enumerate(el):
                    diffs += _diffs(x, {t: float(ref_lp[i, t]) for t in x})
                d = _first_diff(et, ref_greedy)
                first = d if first is None else (first if d is None else min(first, d))
        check.reference = PathCheck(max(diffs, default=0.0), first)
        for path in (check.graph, check.reference):
            if path.max_logprob_diff is not None and not math.isfinite(path.max_logprob_diff):
                path.detail = "non-finite logprobs"
                check.ok = False
            elif path.max_logprob_diff is not None and path.max_logprob_diff > tol:
                check.ok = False
        checks.append(check)
    return VerifyReport(str(llm.device), str(llm.dtype).replace("torch.", ""), llm.ops.name, tol, has_graphs, checks)


def format_report(report: VerifyReport) -> str:
    def cell(p: PathCheck) -> str:
        if p.max_logprob_diff is None:
            return "n/a"
        div = "-" if p.first_divergence is None else f"token {p.first_divergence}"
        return f"{p.max_logprob_diff:.2e} (diverges: {div})"

    lines = [
        f"device {report.device}, dtype {report.dtype}, kernels {report.backend}, "
        f"CUDA graphs {'on' if report.graphs else 'off'}, tolerance {report.tolerance:g}",
        f"{'adapter':<20} {'graph vs eager':<36} {'merged torch reference vs eager':<36} ok",
    ]
    for c in report.checks:
        lines.append(f"{c.adapter:<20} {cell(c.graph):<36} {cell(c.reference):<36} {'yes' if c.ok else 'NO'}")
    if report.dtype != "float32":
        lines.append(
            "note: the reference runs in fp32, so the <base> row is this engine's own 16-bit rounding; "
            "for the strict check of the adapter path run again with --dtype float32"
        )
    return "\n".join(lines)
