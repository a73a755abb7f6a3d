"""Run a 100k-line job in a fresh process and print peak-RSS figures as JSON.

    python tests/batch/memory_probe.py DIR N                 # the fake engine generates every line
    python tests/batch/memory_probe.py DIR N demo FRESH      # the demo model generates the last FRESH
Prints {"job_mb": peak RSS growth of the job, "load_mb": growth from json-loading the same file whole
(what a non-streaming reader would hold), "max_in_flight": ..., "done": ...}. Run in its own process
so that the peak RSS is this job's, not a previous test's.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeLLM, expected_text  # noqa: E402

from lorax.inference.batch_job import JobConfig, run_job  # noqa: E402
from lorax.inference.types import GenerateRequest  # noqa: E402


def peak_mb() -> float:
    # VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """argv: DIR N [demo FRESH]. With `demo`, the real engine on the shipped demo model runs the last
    FRESH lines; the others are already in the output (a huge job being resumed), so all N lines stream
    through the job while the CPU engine only generates what a test can afford."""
    d, n = Path(sys.argv[1]), int(sys.argv[2])
    demo = len(sys.argv) > 3 and sys.argv[3] == "demo"
    fresh = int(sys.argv[4]) if demo else n
    inp = d / "in.jsonl"
    adapters = ["reverse", "upper", "rot13", "swapcase", None]
    with open(inp, "w") as f, open(d / "out.jsonl", "w") as out:
        for i in range(n):
            word = "".join("abcdefghijKLMNOP0123"[(i >> (2 * k)) % 20] for k in range(1 + i % 10))
            f.write(json.dumps({"id": f"req-{i:07d}", "prompt": word + "|", "adapter": adapters[i % 5],
                                "max_tokens": 16, "temperature": 0.0}) + "\n")
            if i < n - fresh:
                out.write(json.dumps({"id": f"req-{i:07d}", "adapter": adapters[i % 5], "text": "done before"}) + "\n")
    if demo:
        from lorax.inference import LLM
        from lorax.inference.recipe import load_recipe

        rec = load_recipe("demo")
        engine = LLM(rec.model, adapters=rec.adapters, **{**rec.engine, "device": "cpu"})
        warm = [GenerateRequest(f"w{i}", prompt="abc|", adapter=adapters[i % 5]) for i in range(64)]
        engine.generate(warm)  # the engine's own first-step allocations are not the job's
        window = 4 * engine.config.max_num_seqs
    else:
        engine = FakeLLM("m", adapters={a: "" for a in adapters if a}, max_num_seqs=256)
        window = 1024
    cfg = JobConfig(inp, d / "out.jsonl", d / "err.jsonl", progress=False, max_in_flight=window, ordered=True)
    before = peak_mb()
    summary = run_job(engine, cfg)
    job = peak_mb() - before
    before = peak_mb()
    with open(inp) as f:
        whole = [json.loads(line) for line in f]  # the reference: a reader that loads everything
    load = peak_mb() - before
    with open(d / "out.jsonl") as f:
        recs = [json.loads(line) for line in f]
    correct = sum(r["text"] == expected_text(whole[int(r["id"][4:])]["prompt"], r["adapter"]) for r in recs
                  if r["text"] != "done before")
    print(json.dumps({"job_mb": job, "load_mb": load, "max_in_flight": summary.max_in_flight_seen,
                      "window": window, "done": summary.done, "skipped": summary.skipped,
                      "errors": summary.errors, "rows": len(whole), "records": len(recs), "correct": correct}))


if __name__ == "__main__":
    main()
