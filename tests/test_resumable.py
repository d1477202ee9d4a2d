"""Tests for the resumable, shardable JSONL runner."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qdistill_hf.reports.resumable import (
    errors_path,
    load_errors,
    merge_parts,
    part_path,
    read_jsonl,
    run_resumable,
    shard_items,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _items(n):
    return [{"study_id": f"s{i:03d}", "x": i} for i in range(n)]


def _square(batch):
    return [{"y": item["x"] ** 2} for item in batch]


def _merged(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_single_run_writes_merged_in_input_order(tmp_path):
    items = _items(7)[::-1]  # input order is not sorted order
    summary = run_resumable(items, _square, tmp_path, batch_size=3, rank=0, world_size=1)
    assert summary.n_done == 7 and summary.n_failed == 0
    rows = _merged(tmp_path / "merged.jsonl")
    assert [r["study_id"] for r in rows] == [it["study_id"] for it in items]
    assert [r["y"] for r in rows] == [36, 25, 16, 9, 4, 1, 0]
    # A rerun does nothing and keeps the file identical.
    before = (tmp_path / "merged.jsonl").read_text()
    again = run_resumable(items, _square, tmp_path, batch_size=3, rank=0, world_size=1)
    assert again.n_done == 0 and again.n_skipped == 7
    assert (tmp_path / "merged.jsonl").read_text() == before


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate study_id values in input: \['a'\]"):
        run_resumable([{"study_id": "a"}, {"study_id": "a"}], _square, tmp_path, rank=0, world_size=1)


def test_two_ranks_disjoint_parts_merge_exactly_once(tmp_path):
    items = _items(11)
    s0 = run_resumable(items, _square, tmp_path, batch_size=4, rank=0, world_size=2, merge=False)
    s1 = run_resumable(items, _square, tmp_path, batch_size=4, rank=1, world_size=2, merge=False)
    assert s0.merged_path is None and s1.merged_path is None
    ids0 = [r["study_id"] for r in read_jsonl(part_path(tmp_path, 0, 2))]
    ids1 = [r["study_id"] for r in read_jsonl(part_path(tmp_path, 1, 2))]
    assert ids0 == [f"s{i:03d}" for i in range(0, 11, 2)]
    assert ids1 == [f"s{i:03d}" for i in range(1, 11, 2)]
    merged = merge_parts(tmp_path, [it["study_id"] for it in items])
    rows = _merged(merged)
    assert [r["study_id"] for r in rows] == [it["study_id"] for it in items]
    # A later single-process rerun sees the 2-shard parts and redoes nothing.
    again = run_resumable(items, _square, tmp_path, rank=0, world_size=1)
    assert again.n_done == 0
    assert len(_merged(tmp_path / "merged.jsonl")) == 11


def test_shard_items_validation():
    assert shard_items(_items(5), 2, 3) == [_items(5)[2]]
    with pytest.raises(ValueError, match="invalid shard: rank=3, world_size=3"):
        shard_items(_items(5), 3, 3)


def test_failures_go_to_errors_file_and_are_retried(tmp_path):
    items = _items(6)
    calls = []

    def flaky(batch):
        calls.append([it["study_id"] for it in batch])
        out = []
        for it in batch:
            if it["x"] in (1, 4):
                out.append(RuntimeError(f"[ERROR: could not read image {it['study_id']}]"))
            else:
                out.append({"report": f"FINDINGS: ok {it['x']}"})
        return out

    s = run_resumable(items, flaky, tmp_path, batch_size=6, rank=0, world_size=1)
    assert s.n_done == 4 and s.failed_ids == ["s001", "s004"]
    merged_text = (tmp_path / "merged.jsonl").read_text()
    assert "ERROR" not in merged_text
    assert [r["study_id"] for r in _merged(tmp_path / "merged.jsonl")] == ["s000", "s002", "s003", "s005"]
    errs = read_jsonl(errors_path(tmp_path, 0))
    assert errs == [
        {"study_id": sid, "error_type": "RuntimeError", "message": f"[ERROR: could not read image {sid}]", "attempt": 1}
        for sid in ("s001", "s004")
    ]
    # Second run retries only the failures; they fail again and the attempt count grows.
    calls.clear()
    run_resumable(items, flaky, tmp_path, batch_size=6, rank=0, world_size=1)
    assert calls == [["s001", "s004"]]
    assert load_errors(tmp_path)["s004"]["attempt"] == 2
    # max_attempts gives up on them instead of retrying.
    calls.clear()
    s3 = run_resumable(items, flaky, tmp_path, rank=0, world_size=1, max_attempts=2)
    assert calls == [] and s3.n_skipped == 6
    # Third run with a fixed function: the failures now succeed, everything exactly once, in input order.
    run_resumable(items, _square, tmp_path, rank=0, world_size=1)
    rows = _merged(tmp_path / "merged.jsonl")
    assert [r["study_id"] for r in rows] == [it["study_id"] for it in items]
    assert "ERROR" not in (tmp_path / "merged.jsonl").read_text()


def test_whole_batch_exception_falls_back_to_single_items(tmp_path):
    def bad_batch(batch):
        if any(it["x"] == 2 for it in batch):
            raise ValueError("bad pixel data")
        return [{"ok": True} for _ in batch]

    s = run_resumable(_items(4), bad_batch, tmp_path, batch_size=4, rank=0, world_size=1)
    assert s.n_done == 3 and s.failed_ids == ["s002"]
    assert read_jsonl(errors_path(tmp_path, 0))[0]["message"] == "bad pixel data"


def test_exception_details_are_stored(tmp_path):
    class ParseFail(ValueError):
        def __init__(self, msg, raw):
            super().__init__(msg)
            self.details = {"raw_outputs": raw}

    run_resumable(_items(1), lambda b: [ParseFail("no JSON", ["non-urgent"])], tmp_path, rank=0, world_size=1)
    assert read_jsonl(errors_path(tmp_path, 0))[0]["details"] == {"raw_outputs": ["non-urgent"]}


def test_torn_trailing_line_is_ignored_and_repaired(tmp_path):
    items = _items(4)
    part = part_path(tmp_path, 0, 1)
    part.parent.mkdir(parents=True)
    part.write_text('{"study_id": "s000", "y": 0}\n{"study_id": "s001", "y"')
    assert read_jsonl(part) == [{"study_id": "s000", "y": 0}]
    s = run_resumable(items, _square, tmp_path, rank=0, world_size=1)
    assert s.n_skipped == 1 and s.n_done == 3
    lines = part.read_text().splitlines()
    assert [json.loads(x)["study_id"] for x in lines] == ["s000", "s001", "s002", "s003"]


def test_corrupt_complete_line_raises_with_location(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"study_id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: invalid JSON"):
        read_jsonl(p)


SLOW_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from qdistill_hf.reports.resumable import run_resumable

    def slow(batch):
        time.sleep(0.05)
        return [{{"y": it["x"] * 10}} for it in batch]

    items = [{{"study_id": f"s{{i:03d}}", "x": i}} for i in range(60)]
    run_resumable(items, slow, sys.argv[1], batch_size=1, rank=0, world_size=1)
    """
)


def test_exactly_once_after_sigkill_and_resume(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT.format(root=str(REPO_ROOT)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)])
    part = part_path(out, 0, 1)
    deadline = time.time() + 30
    while time.time() < deadline:
        if part.is_file() and part.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_jsonl(part))
    assert 5 <= n_before < 60, "the subprocess should have been killed mid-run"
    assert not (out / "merged.jsonl").exists()
    items = [{"study_id": f"s{i:03d}", "x": i} for i in range(60)]
    s = run_resumable(items, lambda b: [{"y": it["x"] * 10} for it in b], out, rank=0, world_size=1)
    assert s.n_skipped == n_before and s.n_done == 60 - n_before
    rows = _merged(out / "merged.jsonl")
    assert [r["study_id"] for r in rows] == [it["study_id"] for it in items]
    assert [r["y"] for r in rows] == [i * 10 for i in range(60)]


def test_rerun_with_another_configuration_is_refused(tmp_path):
    items = _items(3)
    run_resumable(items, _square, tmp_path, rank=0, world_size=1, run_info={"model": "a", "prompt": "p"})
    # Same description: resumes (nothing to do).
    again = run_resumable(items, _square, tmp_path, rank=0, world_size=1, run_info={"model": "a", "prompt": "p"})
    assert again.n_skipped == 3
    with pytest.raises(ValueError, match=r"run_info.json: .*fields \['model'\] differ: recorded \['a'\], now \['b'\]"):
        run_resumable(items, _square, tmp_path, rank=0, world_size=1, run_info={"model": "b", "prompt": "p"})
    assert len(_merged(tmp_path / "merged.jsonl")) == 3


def test_custom_key_errors_are_counted_per_id(tmp_path):
    items = [{"uid": "a"}, {"uid": "b"}]

    def fail_b(batch):
        return [RuntimeError("boom") if it["uid"] == "b" else {"ok": 1} for it in batch]

    for _ in range(2):
        run_resumable(items, fail_b, tmp_path, key="uid", rank=0, world_size=1)
    assert load_errors(tmp_path, key="uid")["b"]["attempt"] == 2
    s = run_resumable(items, fail_b, tmp_path, key="uid", rank=0, world_size=1, max_attempts=2)
    assert s.n_skipped == 2 and s.n_done == 0
    with pytest.raises(ValueError, match=r"errors-00000.jsonl:1: record has no 'study_id' field"):
        load_errors(tmp_path)


def test_strict_reader_for_hand_written_files(tmp_path):
    p = tmp_path / "labels.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}')  # no trailing newline: an ordinary last line, not a torn one
    assert read_jsonl(p, strict=True) == [{"a": 1}, {"a": 2}]
    assert read_jsonl(p) == [{"a": 1}]
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:2: blank line"):
        read_jsonl(p, strict=True)
    p.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        read_jsonl(tmp_path / "missing.jsonl", strict=True)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


ACCELERATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from qdistill_hf.reports.resumable import finish_distributed, run_resumable

    items = [{{"study_id": f"s{{i:03d}}", "x": i}} for i in range(9)]
    s = run_resumable(items, lambda b: [{{"y": it["x"] * 2}} for it in b], sys.argv[1], batch_size=2)
    with open(f"{{sys.argv[1]}}/summary-{{s.rank}}.json", "w") as fh:
        json.dump({{"rank": s.rank, "world": s.world_size, "done": s.n_done, "merged": str(s.merged_path)}}, fh)
    finish_distributed()
    """
)


def test_accelerate_launch_shards_and_main_process_merges(tmp_path):
    script = tmp_path / "launched.py"
    script.write_text(ACCELERATE_SCRIPT.format(root=str(REPO_ROOT)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --cpu would silently start one process (HF_NOTES §6); --multi_gpu on a CPU machine gives gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads((out / f"summary-{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world"], s["done"]) for s in summaries] == [(0, 2, 5), (1, 2, 4)]
    # Only the main process merged (and so only it post-processes).
    assert summaries[0]["merged"] == str(out / "merged.jsonl") and summaries[1]["merged"] == "None"
    assert [r["study_id"] for r in read_jsonl(part_path(out, 1, 2))] == ["s001", "s003", "s005", "s007"]
    rows = _merged(out / "merged.jsonl")
    assert [r["study_id"] for r in rows] == [f"s{i:03d}" for i in range(9)]
    assert [r["y"] for r in rows] == [2 * i for i in range(9)]
