"""Run a 100k-line job on the fake engine in a fresh process and print peak-RSS figures as JSON.

    python tests/batch/memory_probe.py DIR N
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

from fake_engine import FakeLLM  # noqa: E402

from lorax.inference.batch_job import JobConfig, run_job  # noqa: E402


def peak_mb() -> float:
    # VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    d, n = Path(sys.argv[1]), int(sys.argv[2])
    inp = d / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"req-{i:07d}", "prompt": f"abcdefghij{i % 97}|", "adapter": "reverse",
                                "max_tokens": 2, "temperature": 0.0}) + "\n")
    engine = FakeLLM("m", adapters={"reverse": ""}, max_num_seqs=256)
    cfg = JobConfig(inp, d / "out.jsonl", d / "err.jsonl", progress=False, max_in_flight=1024, ordered=True)
    before = peak_mb()
    summary = run_job(engine, cfg)
    job = peak_mb() - before
    before = peak_mb()
    with open(inp) as f:
        whole = [json.loads(line) for line in f]  # the reference: a reader that loads everything
    load = peak_mb() - before
    print(json.dumps({"job_mb": job, "load_mb": load, "max_in_flight": summary.max_in_flight_seen,
                      "done": summary.done, "errors": summary.errors, "rows": len(whole)}))


if __name__ == "__main__":
    main()
