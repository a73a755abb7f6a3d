"""The attention config sweep (kernels/attn_tune.py): its selection and checks, on tiny shapes (the interpreter on
the CPU); what it measures on a GPU is in docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch

import lorax.kernels.attn_tune as at

GRID = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)]
DGRID = [dict(BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_N=32, num_warps=4, num_stages=1)]
SHAPE = (4, 2, 16, 4)  # q heads, KV heads, head dim, block size
KEY = lambda cfg: " ".join(f"{k}={v}" for k, v in cfg.items())


def _tune(device: str):  # type: ignore[no-untyped-def]
    # a fresh chunk and one after a cached prefix in the prefill bucket; a decode batch of 3 over 40 keys
    return at.tune(SHAPE, torch.device(device), log=lambda m: None, prefill={16: [(16, 16, 2), (40, 16, 1)]},
                   decode_batches=(3,), prefill_grid=GRID, decode_grid=DGRID, decode_context=40)


def test_picks_the_least_summed_time_per_bucket(device: str) -> None:
    table, report = _tune(device)
    assert set(table) == {"prefill_kv_D16_G2", "decode_D16_G2"}
    for kind, bucket, grid in (("prefill_kv_D16_G2", "16", GRID), ("decode_D16_G2", "3", DGRID)):
        times = report[f"{kind} {bucket}"]
        assert set(times) == {"default", *(KEY(c) for c in grid)}  # every config ran on every workload
        assert all(len(t) == (2 if kind.startswith("prefill") else 1) and min(t) > 0 for t in times.values())
        pick = table[kind][bucket]
        assert sum(times[KEY(pick)]) == min(sum(times[KEY(c)]) for c in grid)


def test_a_config_with_a_wrong_result_is_dropped(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = at.paged_attention
    bad = GRID[2]

    def wrong_for_one_config(*args, config=None, **kw):  # type: ignore[no-untyped-def]
        out = real(*args, config=config, **kw)
        return out + 1 if config == bad else out

    monkeypatch.setattr(at, "paged_attention", wrong_for_one_config)
    table, report = _tune(device)
    assert KEY(bad) not in report["prefill_kv_D16_G2 16"]
    assert table["prefill_kv_D16_G2"]["16"] != bad and KEY(GRID[0]) in report["prefill_kv_D16_G2 16"]


def test_short_buckets_sweep_short_tiles(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets of at most SMALL_BOUND rows sweep the short-tile grid, longer ones the main grid."""
    monkeypatch.setattr(at, "SMALL_PREFILL_GRID", GRID[:1])
    monkeypatch.setattr(at, "PREFILL_GRID", GRID[1:2])
    _, report = at.tune(SHAPE, torch.device(device), log=lambda m: None,
                        prefill={16: [(16, 16, 1)], 64: [(40, 40, 1)]}, decode_batches=())
    assert set(report["prefill_kv_D16_G2 16"]) == {"default", KEY(GRID[0])}
    assert set(report["prefill_kv_D16_G2 64"]) == {"default", KEY(GRID[1])}


def test_cli_refuses_a_bucket_it_has_no_workloads_for(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("sys.argv", ["attn_tune", "--out-dir", str(tmp_path), "--prefill-buckets", "16,100"])
    with pytest.raises(SystemExit, match=r"bucket\(s\) \[100\]"):
        at.main()
