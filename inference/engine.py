"""`LLM`: the offline engine. add_request / step / generate over the scheduler, runner and LoRA pool.

    llm = LLM("path/or/org/model", adapters={"sql": "org/sql-lora"}, max_loras=4)
    outs = llm.generate([GenerateRequest("r1", prompt="Hi", adapter="sql")])

Start-up order (so the KV cache gets what is really left): config.json -> adapters read and checked
against the model (before any weight loads) -> model built on the device and weights streamed in ->
LoRA slab -> KV cache sized and attached.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.canonical import CanonicalAdapter
from lorax.errors import AdapterError, ConfigError
from lorax.inference.config import EngineConfig, ModelConfig
from lorax.inference.graph import GraphRunner
from lorax.inference.kv_cache import KVCache, plan_num_blocks
from lorax.inference.lora_pool import LoraPool, check_adapter
from lorax.inference.model_runner import ModelRunner
from lorax.inference.models import model_class
from lorax.inference.scheduler import Scheduler
from lorax.inference.sequence import Sequence, Status
from lorax.inference.tokenizer import IncrementalDetokenizer, Tokenizer
from lorax.inference.types import GenerateRequest, RequestOutput
from lorax.inference.weights import dummy_weights, load_weights
from lorax.kernels.registry import get_ops

log = logging.getLogger("lorax.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory, or a Hub repo id fetched (or found in the offline cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model {model!r}: not a directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, or not in the offline cache
        raise ConfigError(f"model {model!r}: not a local directory and not fetchable from the Hub ({exc})") from exc


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine option device={name!r}: no CUDA device is available")
    return device


def _resolve_dtype(name: str, mcfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32  # CPU matmuls in bf16 are slow and the references compare in fp32
    return _DTYPES.get(mcfg.torch_dtype, torch.bfloat16) if mcfg.torch_dtype != "float32" else torch.bfloat16


def _cpu_threads(device: torch.device, mcfg: ModelConfig) -> None:
    """Small models on the CPU run one intra-op thread unless the user set OMP_NUM_THREADS.

    Their ops are too small to split, and OpenMP workers spinning on a busy machine made the demo
    batch-run 35x slower (0.6 s vs 21 s on a loaded 2-core box)."""
    if device.type == "cpu" and mcfg.hidden_size <= 1024 and "OMP_NUM_THREADS" not in os.environ:
        if torch.get_num_threads() != 1:
            log.info("small model on the CPU: using one torch thread (set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(1)


def _adapter_loader(sources: dict[str, str]) -> Callable[[str], CanonicalAdapter]:
    def load(name: str) -> CanonicalAdapter:
        try:
            from lorax.adapters import load_adapter
        except ImportError as exc:
            raise AdapterError("this build of lorax cannot read adapter files yet (lorax.adapters.load_adapter)") from exc
        adapter: CanonicalAdapter = load_adapter(sources[name], name=name)
        return adapter

    return load


class LLM:
    def __init__(
        self,
        model: str,
        adapters: dict[str, str | CanonicalAdapter] | None = None,
        **engine_options: Any,
    ) -> None:
        self.config = EngineConfig.from_options(engine_options)
        cfg = self.config
        self.model_name = model
        self.model_dir = resolve_model_dir(model, cfg.revision)
        self.model_config = mcfg = ModelConfig.from_pretrained_dir(self.model_dir)
        self.device = _resolve_device(cfg.device)
        self.dtype = _resolve_dtype(cfg.dtype, mcfg, self.device)
        _cpu_threads(self.device, mcfg)
        self._tokenizer: Tokenizer | None = None
        if (self.model_dir / "tokenizer.json").exists():
            self._tokenizer = Tokenizer.from_dir(self.model_dir)
        self.eos_token_ids = self._eos_ids()

        limit, why = mcfg.max_position_embeddings, "max_position_embeddings"
        if mcfg.sliding_window is not None and mcfg.sliding_window < limit:
            limit, why = mcfg.sliding_window, "sliding_window (sliding-window attention is not implemented)"
        max_len = cfg.max_model_len or limit
        if max_len > limit:
            raise ConfigError(f"engine option max_model_len={max_len} exceeds the model's {why}={limit}")

        # Adapters are read and checked before any weight is loaded: a bad adapter fails in seconds.
        host_adapters: dict[str, CanonicalAdapter] = {}
        sources = {n: s for n, s in (adapters or {}).items() if isinstance(s, str)}
        loader = _adapter_loader(sources) if sources else None
        for name, src in (adapters or {}).items():
            adapter = src if isinstance(src, CanonicalAdapter) else _adapter_loader(sources)(name)
            self._check_adapter(name, adapter)
            host_adapters[name] = adapter
        self.adapter_names = list(host_adapters)

        self.ops = get_ops(self.device, cfg.kernel_backend)
        cls = model_class(mcfg.model_type)
        self.model = cls(mcfg, self.ops, self.dtype, self.device, max_len)
        params = self.model.named_weights()
        if cfg.load_format == "dummy":
            dummy_weights(params, cfg.seed)
        else:
            load_weights(params, self.model_dir, mcfg)

        self.pool: LoraPool | None = None
        if host_adapters:
            self.pool = LoraPool(
                self.model, mcfg, cfg.max_loras, cfg.max_lora_rank, host_adapters,
                loader=loader if len(sources) == len(host_adapters) else None,
                max_cpu_loras=cfg.max_cpu_loras,
            )

        # Graph buffers are allocated before the KV cache is sized (they are part of what is not left).
        graphs = self._graph_runner(max_len) if self._use_graphs() else None
        num_blocks = plan_num_blocks(mcfg, cfg, max_len, self.dtype, self.device)
        capacity = (num_blocks - 1) * cfg.block_size
        if capacity < max_len:
            if cfg.max_model_len:
                raise ConfigError(
                    f"engine option max_model_len={cfg.max_model_len} needs {max_len} KV slots but only "
                    f"{capacity} fit; lower max_model_len or give the cache more memory"
                )
            log.warning("max_model_len lowered from %d to %d to fit the KV cache", max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.kv_cache = KVCache(mcfg, num_blocks, cfg.block_size, self.dtype, self.device)
        self.kv_cache.attach([layer.attn for layer in self.model.layers])

        gib = 2.0**-30
        log.info(
            "%s on %s (%s, %s kernels): weights %.2f GiB, LoRA slab %.2f GiB (%d slots x rank %d, %d adapters), "
            "KV cache %d blocks x %d tokens (%.2f GiB), max_model_len %d",
            model, self.device, str(self.dtype).removeprefix("torch."), self.ops.name,
            sum(t.numel() * t.element_size() for t in params.values()) * gib,
            (self.pool.nbytes if self.pool else 0) * gib, cfg.max_loras, cfg.max_lora_rank, len(host_adapters),
            num_blocks, cfg.block_size, sum(t.numel() * t.element_size() for t in self.kv_cache.k + self.kv_cache.v) * gib,
            max_len,
        )
        self.scheduler = Scheduler(
            self.kv_cache.allocator, self.pool, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens
        )
        self.runner = ModelRunner(self.model, cfg.block_size, self.device, self.ops, self.pool)
        if graphs is not None:
            graphs.capture()
            self.runner.graphs = graphs
        self._rng = random.Random(cfg.seed)
        self._next_index = 0
        self._early: list[RequestOutput] = []  # requests refused at add time, returned by the next step()
        self._steps = {"prefill": 0, "decode": 0, "tokens_in": 0, "tokens_out": 0}

    def _use_graphs(self) -> bool:
        # The torch references synchronise with the host, so only the Triton backend can be captured.
        return self.device.type == "cuda" and not self.config.enforce_eager and self.ops.name == "triton"

    def _graph_runner(self, max_len: int) -> GraphRunner:
        return GraphRunner(self.model, self.config.max_num_seqs, max_len, self.config.block_size, self.device, self.pool)

    # ---- properties of the public API -----------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Counters since start-up: steps by kind, tokens fed / sampled, preemptions, adapter slot loads."""
        return {
            "prefill_steps": self._steps["prefill"],
            "decode_steps": self._steps["decode"],
            "tokens_fed": self._steps["tokens_in"],
            "tokens_sampled": self._steps["tokens_out"],
            "preemptions": self.scheduler.num_preemptions,
            "adapter_loads": self.pool.num_loads if self.pool is not None else 0,
        }

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ConfigError(f"{self.model_dir}: the model has no tokenizer.json (pass prompt_token_ids)")
        return self._tokenizer

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        gen = self.model_dir / "generation_config.json"
        if gen.exists():
            import json

            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer is not None and self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return frozenset(ids)

    def _check_adapter(self, name: str, adapter: CanonicalAdapter) -> None:
        try:
            from lorax.adapters.model_config import check_against_config
        except ImportError:  # pragma: no cover - older adapters package
            check_against_config = None  # type: ignore[assignment]
        if check_against_config is not None:
            problems = check_against_config(adapter, self.model_config.hf_config)
            if problems:
                raise AdapterError(f"adapter {name!r} does not fit {self.model_name}: {'; '.join(problems)}")
        check_adapter(adapter, self.model_config, self.config.max_lora_rank)

    # ---- requests --------------------------------------------------------------------------------
    def _refuse(self, req: GenerateRequest, ids: list[int], why: str) -> RequestOutput:
        return RequestOutput(req.request_id, req.adapter, ids, error=why)

    def _make_sequence(self, req: GenerateRequest, index: int) -> Sequence | RequestOutput:
        sp = req.sampling
        try:
            sp.validate()
        except ValueError as exc:
            return self._refuse(req, [], f"bad sampling parameters: {exc}")
        if req.adapter is not None and req.adapter not in self.adapter_names:
            known = ", ".join(self.adapter_names) or "none"
            return self._refuse(req, [], f"unknown adapter {req.adapter!r} (loaded: {known})")
        if (req.prompt is None) == (req.prompt_token_ids is None):
            return self._refuse(req, [], "give exactly one of prompt / prompt_token_ids")
        if req.prompt == "":
            return self._refuse(req, [], "empty prompt")
        if sp.stop and self._tokenizer is None:
            return self._refuse(req, [], "stop strings need a tokenizer (the model has no tokenizer.json)")
        if req.prompt is not None:
            if self._tokenizer is None:
                return self._refuse(req, [], "the model has no tokenizer; give prompt_token_ids")
            ids = self._tokenizer.encode(req.prompt)
        else:
            ids = list(req.prompt_token_ids or [])
        if not ids:
            return self._refuse(req, ids, "empty prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            return self._refuse(req, ids, f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            return self._refuse(
                req, ids, f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} (no room to generate)"
            )
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(32)
        seq = Sequence(req.request_id, index, req.adapter, sp, ids, seed=seed & 0xFFFFFFFF)
        if self._tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self._tokenizer, ids)
        if sp.logprobs is not None:
            seq.logprobs = []
        return seq

    def _add(self, req: GenerateRequest) -> int:
        index = self._next_index
        self._next_index += 1
        made = self._make_sequence(req, index)
        if isinstance(made, RequestOutput):
            made.metrics["index"] = index
            self._early.append(made)
        else:
            self.scheduler.add(made)
        return index

    def add_request(self, req: GenerateRequest) -> None:
        self._add(req)

    def has_unfinished(self) -> bool:
        return bool(self._early) or self.scheduler.has_unfinished()

    # ---- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._early = self._early, []
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.has_unfinished() and not outputs:
                # max_model_len fits the cache and slots free as requests finish, so this is a bug.
                raise RuntimeError("the scheduler could not schedule any waiting request")
            return outputs
        result = self.runner.step(batch)
        self.scheduler.commit(batch)
        self._steps["decode" if batch.is_decode else "prefill"] += 1
        self._steps["tokens_in"] += sum(batch.num_new)
        self._steps["tokens_out"] += len(result.ids)
        for row, seq in enumerate(result.seqs):
            logprob = result.logprob[row] if result.logprob is not None else None
            top = None
            if result.top_ids is not None and result.top_logprobs is not None:
                top = list(zip(result.top_ids[row], result.top_logprobs[row], strict=True))
            if seq.append(result.ids[row], self.eos_token_ids, self.max_model_len, logprob, top):
                self.scheduler.finish(seq)
                outputs.append(self._output(seq))
        return outputs

    def _output(self, seq: Sequence) -> RequestOutput:
        now = time.monotonic()
        return RequestOutput(
            request_id=seq.request_id,
            adapter=seq.adapter,
            prompt_token_ids=seq.prompt_ids,
            token_ids=seq.output_ids,
            text=seq.text,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs,
            metrics={
                "index": seq.index,
                "num_prompt_tokens": len(seq.prompt_ids),
                "num_output_tokens": len(seq.output_ids),
                "num_preemptions": seq.num_preemptions,
                "time_to_first_token_s": (seq.first_token_time or now) - seq.arrival_time,
                "latency_s": now - seq.arrival_time,
            },
        )

    @torch.inference_mode()
    def prompt_logits(self, req: GenerateRequest) -> torch.Tensor:
        """fp32 logits [L, V] at every prompt position (chunked like any prefill), for verification
        tools and tests. Runs alone: call it only when no request is in flight."""
        if self.has_unfinished():
            raise RuntimeError("prompt_logits runs only while the engine is idle")
        made = self._make_sequence(req, -1)
        if isinstance(made, RequestOutput):
            raise ValueError(made.error)
        seq, sched = made, self.scheduler
        sched.add(seq)
        chunks: list[torch.Tensor] = []
        try:
            while seq.num_computed < seq.num_tokens:
                batch = sched.schedule()
                assert batch is not None and batch.seqs == [seq]
                logits, _ = self.runner.forward_logits(batch, all_rows=True)
                chunks.append(logits.cpu())
                sched.commit(batch)
        finally:
            if seq in sched.running:
                sched.finish(seq)
        return torch.cat(chunks)

    def generate(self, requests: list[GenerateRequest], use_tqdm: bool = False) -> list[RequestOutput]:
        """Run requests to completion; results in input order (failed requests carry .error).
        Drains the engine: outputs of requests added earlier with add_request are dropped."""
        first = self._next_index
        for req in requests:
            self._add(req)
        results: dict[int, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        while self.has_unfinished():
            for out in self.step():
                results[out.metrics["index"]] = out
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[first + i] for i in range(len(requests))]


__all__ = ["LLM", "Status", "resolve_model_dir"]
