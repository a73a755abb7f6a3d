"""Where does a decode step's time go? (a developer tool; run on a GPU)

    python scripts/profile_decode.py --layers 24 --batch 64 [--adapters 8] [--out DIR]

Builds the standard Qwen3-30B-A3B-shaped engine (dummy weights, cut to --layers), prefills --batch
prompts, then over 20 decode steps measures: the wall time of LLM.step(), the GPU time of the graph
replay (CUDA events around it), and the host time before the replay is launched. Then it profiles a few
eager decode forwards with torch.profiler and prints the CUDA kernels by total time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.inference.bench_inputs import (
    STANDARD_MODEL,
    adapter_name,
    make_prompts,
    random_adapter,
    write_model_dir,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=None, help="engine max_model_len (default: the model's)")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(STANDARD_MODEL, Path(tmp), args.layers)
        from lorax.inference.config import ModelConfig

        mcfg = ModelConfig.from_pretrained_dir(model_dir)
        adapters = {adapter_name(j): random_adapter(mcfg, adapter_name(j), 16, j, torch.bfloat16, dev)
                    for j in range(args.adapters)}
        llm = LLM(str(model_dir), adapters=adapters, load_format="dummy", dtype="bfloat16",
                  max_num_seqs=args.batch, max_loras=max(1, args.adapters), max_num_batched_tokens=8192,
                  max_model_len=args.max_model_len)
        names = list(adapters) or [None]
        prompts = make_prompts(args.batch, args.input_len, mcfg.vocab_size, 0)
        for i, p in enumerate(prompts):
            llm.add_request(GenerateRequest(f"p{i}", prompt_token_ids=p, adapter=names[i % len(names)],
                                            sampling=SamplingParams(max_tokens=60, ignore_eos=True)))
        while any(s.num_computed < s.num_tokens - 1 for s in llm.scheduler.running) or llm.scheduler.waiting:
            llm.step()  # prefill
        graphs = llm.runner.graphs
        assert graphs is not None
        replay_ms: list[float] = []
        host_ms: list[float] = []
        original = graphs.forward_logits

        def timed(batch):  # type: ignore[no-untyped-def]
            host_ms.append((time.perf_counter() - t_step) * 1e3)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = original(batch)
            end.record()
            events.append((start, end))
            return out

        graphs.forward_logits = timed  # type: ignore[method-assign]
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        step_ms: list[float] = []
        for _ in range(20):
            t_step = time.perf_counter()
            llm.step()
            step_ms.append((time.perf_counter() - t_step) * 1e3)
        torch.cuda.synchronize()
        replay_ms = [s.elapsed_time(e) for s, e in events]
        graphs.forward_logits = original  # type: ignore[method-assign]
        print(f"batch {args.batch}, {args.layers} layers, {args.adapters} adapters")
        print(f"LLM.step wall ms   median {statistics.median(step_ms):.2f}")
        print(f"graph replay GPU ms median {statistics.median(replay_ms):.2f} "
              f"({statistics.median(replay_ms) / args.layers * 1e3:.0f} us/layer incl. lm_head)")
        print(f"host ms before replay median {statistics.median(host_ms):.2f}")

        # eager forwards under the profiler: kernel time by name
        llm.runner.graphs = None
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                llm.step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total", row_limit=25)
        print(table)
        launches = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"GPU launches (kernels, copies, fills) per decode step: {launches / 3:.0f}, "
              f"{launches / 3 / args.layers:.1f} per layer (lm_head and sampling counted in)")
        if args.out:
            Path(args.out, "profile.txt").write_text(table)


if __name__ == "__main__":
    main()
