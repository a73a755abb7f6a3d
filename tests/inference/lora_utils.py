"""Hand-made canonical adapters for tiny models, and the oracle: the same delta merged into HF weights."""

from __future__ import annotations

import copy

import torch

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora


def _dims(cfg: object) -> dict[str, int]:
    H = cfg.hidden_size  # type: ignore[attr-defined]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads  # type: ignore[attr-defined]
    D = getattr(cfg, "head_dim", None) or H // nh
    return {"H": H, "q": nh * D, "kv": nkv * D}


def _moe_layers(model: torch.nn.Module) -> dict[int, tuple[int, int]]:
    """layer -> (E, I) for the MoE layers of an HF model (fused experts in memory)."""
    out = {}
    for i, layer in enumerate(model.model.layers):  # type: ignore[attr-defined]
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            E, two_i, _ = experts.gate_up_proj.shape
            out[i] = (E, two_i // 2)
    return out


def _pair(r: int, fin: int, fout: int, scale: float) -> LoraPair:
    return LoraPair(A=torch.randn(r, fin) * scale, B=torch.randn(fout, r) * scale)


def random_adapter(
    model: torch.nn.Module,
    name: str,
    rank: int,
    moe_format: str = "per-expert",  # per-expert | shared-outer | none
    attention: bool = True,
    dense_mlp: bool = True,
    seed: int = 0,
    scale: float = 0.3,
) -> CanonicalAdapter:
    """Random adapter on q/k/v/o, dense MLPs / shared experts, and experts, in canonical form."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        cfg = model.config  # type: ignore[attr-defined]
        d = _dims(cfg)
        H, r = d["H"], rank
        ad = CanonicalAdapter(name=name, moe_format=moe_format if moe_format != "none" else "none")
        moe = _moe_layers(model)
        for i, layer in enumerate(model.model.layers):  # type: ignore[attr-defined]
            if attention:
                for mod, (fin, fout) in {
                    "self_attn.q_proj": (H, d["q"]), "self_attn.k_proj": (H, d["kv"]),
                    "self_attn.v_proj": (H, d["kv"]), "self_attn.o_proj": (d["q"], H),
                }.items():
                    ad.dense[(i, mod)] = _pair(r, fin, fout, scale)
            mlp = layer.mlp
            prefix = None
            if i not in moe:
                prefix, inter = "mlp.", mlp.gate_proj.weight.shape[0]
            elif getattr(mlp, "shared_expert", None) is not None:
                prefix, inter = "mlp.shared_expert.", mlp.shared_expert.gate_proj.weight.shape[0]
            if dense_mlp and prefix is not None:
                ad.dense[(i, prefix + "gate_proj")] = _pair(r, H, inter, scale)
                ad.dense[(i, prefix + "up_proj")] = _pair(r, H, inter, scale)
                ad.dense[(i, prefix + "down_proj")] = _pair(r, inter, H, scale)
            if i in moe and moe_format != "none":
                E, inter = moe[i]
                outer = 1 if moe_format == "shared-outer" else E
                ad.moe[i] = MoELora(
                    gate_up_A=torch.randn(outer, 2 * r, H) * scale,
                    gate_up_B=torch.randn(E, 2 * inter, r) * scale,
                    down_A=torch.randn(E, r, inter) * scale,
                    down_B=torch.randn(outer, H, r) * scale,
                )
    return ad


@torch.no_grad()
def merged(model: torch.nn.Module, adapter: CanonicalAdapter) -> torch.nn.Module:
    """A copy of the HF model with every delta of `adapter` added into its weights (fp32)."""
    out = copy.deepcopy(model)
    for (i, mod), pair in adapter.dense.items():
        w = out.get_parameter(f"model.layers.{i}.{mod}.weight")
        w += pair.delta().to(w.dtype)
    for i, m in adapter.moe.items():
        experts = out.model.layers[i].mlp.experts  # type: ignore[attr-defined]
        inter = experts.gate_up_proj.shape[1] // 2
        for e in range(m.num_experts):
            gate, up, down = m.expert_deltas(e)
            experts.gate_up_proj[e, :inter] += gate
            experts.gate_up_proj[e, inter:] += up
            experts.down_proj[e] += down
    return out
