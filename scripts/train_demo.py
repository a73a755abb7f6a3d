"""Train the embedded demo: a ~1M-parameter Qwen3-MoE on a string copy task, plus four LoRA adapters.

    python scripts/train_demo.py --out recipes/demo            # everything (base, then adapters)
    python scripts/train_demo.py --out recipes/demo --only reverse   # one adapter on the shipped base

The forward pass is transformers' ``Qwen3MoeForCausalLM`` (a test/dev dependency of lorax): training
through the same module that the tests use as the oracle rules out any mismatch between a home-made
forward and what ships. Everything runs on the CPU in fp32, seeded; the shipped weights are rounded
to bf16 and every figure the script prints is measured *after* that rounding.

Task and prompt format (token ids: 0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3):

    <bos> a b c |   ->   a b c <eos>          (copy: the base model)

Strings are 1..12 characters of [A-Za-z0-9]. The tokenizer prepends <bos> by default
(``add_special_tokens=True``), and never appends <eos>. Adapters map the same prompt to another
answer: reverse (abc -> cba), upper (aB1 -> AB1), rot13 (aN1 -> nA1), swapcase (aB1 -> Ab1).

LoRA deltas are added to the base weights through ``torch.nn.utils.parametrize`` (W + s * B @ A for
q/k/v/o; per-expert deltas on the fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``), with
the factors held in the layout that will be written, so each layout is trained as itself:

    fused (PEFT target_parameters)   gate_up A [E, r, H], B [E, 2I, r];  down A [E, r, I], B [E, H, r]
    per-expert (legacy keys)         gate/up A [E, r, H], B [E, I, r] each; down as fused
    shared-outer                     w1/w3 A [1, r, H] (ONE parameter for all experts), B [E, I, r];
                                     w2 A [E, r, I], B [1, H, r] (one parameter)

PEFT-layout adapters are written by PEFT itself (the factors copied into a ``get_peft_model`` wrapper,
then ``save_pretrained``) and reloaded with ``PeftModel.from_pretrained`` to check the logits agree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from lorax.recipes.demo_tasks import ADAPTER_LAYOUTS, ALPHABET, TASKS

MIN_LEN, MAX_LEN = 1, 12
PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
SEP = "|"
RANK, ALPHA = 16, 32
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_NAME = "lorax-demo-qwen3-moe"  # recorded in adapter_config.json; the base ships at recipes/demo/model

ADAPTERS = ADAPTER_LAYOUTS  # adapter name -> expert layout it is trained and stored in


def model_config() -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 256 + BYTE_OFFSET,
        "hidden_size": 128,
        "intermediate_size": 256,  # dense MLP size; unused (every layer is sparse)
        "moe_intermediate_size": 64,  # != hidden_size on purpose: transposed expert weights fail loudly
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "output_router_logits": False,  # generate() breaks with it on
        "router_aux_loss_coef": 0.01,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "initializer_range": 0.02,
    }


# ---------------------------------------------------------------- tokenizer


def byte_unicode_map() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def write_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
    vocab.update({ch: b + BYTE_OFFSET for b, ch in byte_unicode_map().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<bos>", "<eos>")])
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "padding_side": "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False, "max_new_tokens": 16}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def encode(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode()]


# ---------------------------------------------------------------- data


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_batch(rng: random.Random, task: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [n, T] ids and labels (-100 except on the answer and its <eos>).

    Right padding is harmless without an attention mask: attention is causal, so pads only follow.
    """
    rows, labels = [], []
    for _ in range(n):
        s = random_string(rng)
        prompt = [BOS] + encode(s + SEP)
        answer = encode(TASKS[task](s)) + [EOS]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def held_out(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [random_string(rng) for _ in range(n)]


@torch.no_grad()
def greedy(model: nn.Module, strings: list[str]) -> list[str]:
    """Greedy answers, batching prompts of equal length (so no padding at all)."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(strings):
        by_len.setdefault(len(s), []).append(i)
    out = [""] * len(strings)
    for n, idx in by_len.items():
        ids = torch.tensor([[BOS] + encode(strings[i] + SEP) for i in idx])
        done = torch.zeros(len(idx), dtype=torch.bool)
        gen: list[torch.Tensor] = []
        for _ in range(n + 2):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            gen.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == EOS
            if done.all():
                break
        toks = torch.stack(gen, 1).tolist()
        for row, i in zip(toks, idx, strict=True):
            cut = row.index(EOS) if EOS in row else None
            body = row[:cut] if cut is not None else row + [-1]  # no <eos>: never an exact match
            out[i] = bytes(t - BYTE_OFFSET if t >= BYTE_OFFSET else 0 for t in body).decode("latin-1")
            if cut is None:
                out[i] += "\x00<no-eos>"
    return out


def exact_match(model: nn.Module, task: str, strings: list[str]) -> float:
    preds = greedy(model, strings)
    return sum(p == TASKS[task](s) for p, s in zip(preds, strings, strict=True)) / len(strings)


# ---------------------------------------------------------------- training


def train(model: nn.Module, params: list[nn.Parameter], task: str, steps: int, lr: float, seed: int,
          batch: int = 64, aux: bool = False, log_every: int = 100) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, lab = make_batch(rng, task, batch)
        # cached(): each LoRA delta is built once per step, not once per expert lookup
        with parametrize.cached():
            out = model(input_ids=ids, output_router_logits=aux)
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
            if aux:  # load balancing keeps every expert in use (the engine tests want all experts routed)
                loss = loss + 0.01 * out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  [{task}] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def build_model(path: Path | None):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if path is not None:
        return Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**model_config())).float()


def train_base(out: Path, steps: int, seed: int, eval_strings: list[str]) -> None:
    torch.manual_seed(seed)
    model = build_model(None)
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n:,} parameters", flush=True)
    train(model, list(model.parameters()), "copy", steps, lr=3e-3, seed=seed, aux=True)
    mdir = out / "model"
    mdir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(mdir)  # per-expert keys, bf16
    hub_style_config(mdir / "config.json")
    write_tokenizer(mdir)
    print(f"base copy exact match (bf16 weights): {exact_match(build_model(mdir), 'copy', eval_strings):.3f}")


def hub_style_config(path: Path) -> None:
    """Spell config.json the way Qwen3-30B-A3B's Hub config does (what other readers expect).

    transformers 5 writes ``num_local_experts`` and ``rope_parameters``; it reads the Hub spelling
    (``num_experts``, ``rope_theta``) back to the same config.
    """
    cfg = json.loads(path.read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg["dtype"]
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


# ---------------------------------------------------------------- LoRA through parametrizations


class AddDelta(nn.Module):
    """Parametrization W -> W + delta(): the delta is computed from factors owned elsewhere."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.fn()


def _a(g: torch.Generator, *shape: int) -> nn.Parameter:
    # A ~ N(0, 1/in) so B @ A starts at exactly zero (B = 0) with a useful gradient on B.
    return nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(shape[-1]))


def _b(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def attach_lora(model: nn.Module, layout: str, seed: int) -> dict[str, nn.Parameter]:
    """Attach trainable LoRA factors (names as stored in the layout's file, minus the PEFT prefix)."""
    cfg = model.config
    E, H, I, r = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, RANK  # noqa: E741
    s = ALPHA / RANK
    g = torch.Generator().manual_seed(seed)
    factors: dict[str, nn.Parameter] = {}
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        for name in ATTN:
            lin = getattr(layer.self_attn, name)
            A, B = _a(g, r, lin.in_features), _b(lin.out_features, r)
            factors[f"{pre}.self_attn.{name}.lora_A.weight"] = A
            factors[f"{pre}.self_attn.{name}.lora_B.weight"] = B
            parametrize.register_parametrization(lin, "weight", AddDelta(lambda A=A, B=B: s * B @ A))
        ex = layer.mlp.experts
        f: dict[str, nn.Parameter]
        if layout == "fused":
            f = {"gu_A": _a(g, E, r, H), "gu_B": _b(E, 2 * I, r), "d_A": _a(g, E, r, I), "d_B": _b(E, H, r)}
            gate_up = lambda f=f: s * f["gu_B"] @ f["gu_A"]
        elif layout == "per-expert":
            f = {"g_A": _a(g, E, r, H), "g_B": _b(E, I, r), "u_A": _a(g, E, r, H), "u_B": _b(E, I, r),
                 "d_A": _a(g, E, r, I), "d_B": _b(E, H, r)}
            gate_up = lambda f=f: s * torch.cat([f["g_B"] @ f["g_A"], f["u_B"] @ f["u_A"]], 1)
        elif layout == "shared-outer":
            # w1/w3 A and w2 B are single [1, ...] parameters broadcast over experts: truly shared.
            f = {"w1_A": _a(g, 1, r, H), "w1_B": _b(E, I, r), "w3_A": _a(g, 1, r, H), "w3_B": _b(E, I, r),
                 "w2_A": _a(g, E, r, I), "w2_B": _b(1, H, r)}
            gate_up = lambda f=f: s * torch.cat([f["w1_B"] @ f["w1_A"], f["w3_B"] @ f["w3_A"]], 1)
        else:
            raise ValueError(layout)
        dA, dB = ("w2_A", "w2_B") if layout == "shared-outer" else ("d_A", "d_B")
        down = lambda f=f, dA=dA, dB=dB: s * f[dB] @ f[dA]
        parametrize.register_parametrization(ex, "gate_up_proj", AddDelta(gate_up))
        parametrize.register_parametrization(ex, "down_proj", AddDelta(down))
        for k, v in f.items():
            factors[f"{pre}.mlp.experts.{k}"] = v
    return factors


def round_bf16(factors: dict[str, nn.Parameter]) -> None:
    with torch.no_grad():
        for p in factors.values():
            p.copy_(p.to(torch.bfloat16).float())


def adapter_config(target_modules: list[str], **extra: object) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "target_modules": sorted(target_modules),
        "base_model_name_or_path": BASE_NAME,
        **extra,
    }


def write_manual(adir: Path, layout: str, factors: dict[str, nn.Parameter], cfg) -> None:
    """per-expert and shared-outer files (PEFT key prefix, bf16)."""
    E = cfg.num_experts
    t: dict[str, torch.Tensor] = {}
    for k, v in factors.items():
        if ".self_attn." in k:
            t[f"base_model.model.{k}"] = v.detach()
            continue
        pre, name = k.rsplit(".", 1)  # "model.layers.i.mlp.experts", "g_A"
        if layout == "per-expert":
            proj = {"g": "gate_proj", "u": "up_proj", "d": "down_proj"}[name[0]]
            for e in range(E):
                t[f"base_model.model.{pre}.{e}.{proj}.lora_{name[-1]}.weight"] = v[e].detach()
        else:
            t[f"base_model.model.{pre}.{name[:2]}.lora_{name[-1]}.weight"] = v.detach()
    t = {k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}
    # metadata holds one key: safetensors writes a metadata map in no fixed order, and the files must
    # reproduce byte for byte; the layout marker lives in adapter_config.json instead.
    save_file(t, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if layout == "per-expert":
        conf = adapter_config(list(ATTN) + ["gate_proj", "up_proj", "down_proj"])
    else:
        conf = adapter_config(list(ATTN) + ["w1", "w2", "w3"], lorax_moe_layout="shared-outer")
    (adir / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def write_peft_fused(adir: Path, base_dir: Path, factors: dict[str, nn.Parameter]) -> nn.Module:
    """Copy trained fused factors into a PEFT wrapper and let PEFT write the directory."""
    from peft import LoraConfig, get_peft_model

    base = build_model(base_dir)
    E = base.config.num_experts
    conf = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(ATTN),
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = get_peft_model(base, conf)
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    new: dict[str, torch.Tensor] = {}
    for k in sd:
        # PEFT key: base_model.model.model.layers.i.<...>.lora_X.default.weight
        body = k.removeprefix("base_model.model.").replace(".default", "")
        if ".self_attn." in body:
            new[k] = factors[body].detach()
            continue
        pre = body.split(".mlp.")[0] + ".mlp.experts"
        X = "A" if ".lora_A." in body else "B"
        # gate_up vs down: told apart by the A of the same wrapper (in-dim H vs I). B alone cannot
        # tell: here 2I == H, so both B's are [H, E*r].
        is_gu = sd[k.replace(".lora_B.", ".lora_A.")].shape[1] == base.config.hidden_size
        f = factors[f"{pre}.{'gu' if is_gu else 'd'}_{X}"].detach()
        if X == "A":  # [E, r, in] -> rows e*r + j
            new[k] = f.reshape(E * RANK, -1)
        else:  # [E, out, r] -> columns j*E + e
            new[k] = f.permute(1, 2, 0).reshape(f.shape[1], RANK * E)
        assert new[k].shape == sd[k].shape, (k, new[k].shape, sd[k].shape)
    missing = set(sd) - set(new)
    assert not missing, missing
    pm.load_state_dict(new, strict=False)
    pm.save_pretrained(adir)
    (adir / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, all placeholders
    # PEFT writes fp32; the factors are already bf16-rounded, so this cast is lossless.
    path = adir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    conf = json.loads((adir / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = BASE_NAME
    conf["task_type"] = "CAUSAL_LM"
    for key in ("target_modules", "target_parameters"):  # PEFT writes these from a set: fix the order
        conf[key] = sorted(conf[key])
    (adir / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return pm


def train_adapter(out: Path, name: str, steps: int, seed: int, eval_strings: list[str]) -> float:
    layout = ADAPTERS[name]
    base_dir = out / "model"
    torch.manual_seed(seed)
    model = build_model(base_dir)
    factors = attach_lora(model, layout, seed)
    print(f"{name} ({layout}): {sum(p.numel() for p in factors.values()):,} LoRA parameters", flush=True)
    train(model, list(factors.values()), name, steps, lr=3e-3, seed=seed)
    round_bf16(factors)  # measure what ships
    adir = out / "adapters" / name
    if adir.exists():
        shutil.rmtree(adir)
    adir.mkdir(parents=True)
    em = exact_match(model, name, eval_strings)
    print(f"{name}: exact match {em:.3f} (bf16 factors, parametrized model)", flush=True)
    if layout == "fused":
        write_peft_fused(adir, base_dir, factors)
        check_peft(adir, base_dir, model)
        # PEFT's saved config lists target_parameters; rewrite nothing else
    else:
        write_manual(adir, layout, factors, model.config)
        if layout == "per-expert":
            check_peft(adir, base_dir, model)
    return em


@torch.no_grad()
def check_peft(adir: Path, base_dir: Path, ref: nn.Module) -> None:
    """The written directory, loaded by PEFT, must reproduce the trained model's logits."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(build_model(base_dir), adir).eval()
    ids, _ = make_batch(random.Random(123), "copy", 8)
    got, want = pm(input_ids=ids).logits, ref(input_ids=ids).logits
    err = (got - want).abs().max().item()
    print(f"  PEFT reload of {adir.name}: max |logit diff| = {err:.2e}", flush=True)
    if err > 1e-3:
        raise SystemExit(f"PEFT reload of {adir} disagrees with the trained model ({err})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("recipes/demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--adapter-steps", type=int, default=800)
    ap.add_argument("--only", default=None, help="'base', or one adapter name (trained on the shipped base)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a shared CPU, and results can depend on it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evals = held_out(10_000 + args.seed, 200)
    t0 = time.time()
    if args.only in (None, "base"):
        train_base(args.out, args.base_steps, args.seed, evals)
    for k, name in enumerate(ADAPTERS):
        if args.only in (None, name):
            train_adapter(args.out, name, args.adapter_steps, args.seed + 1 + k, evals)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
