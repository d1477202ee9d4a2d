"""Resumable, shardable per-study JSONL runner (shared by pseudo-report generation and priority scoring).

Layout under ``out_dir``::

    run_info.json                        what produced the outputs (generator, model, prompt...); checked on resume
    parts/part-<rank>-of-<world>.jsonl   one JSON object per finished study, appended + fsync'ed
    parts/errors-<rank>.jsonl            one JSON object per failed attempt (never an output)
    <merged_name>                        every finished study exactly once, in input order

Guarantees:

* A study is skipped on rerun when it appears in *any* part file or in the merged file, so reruns with a
  different number of processes never redo or duplicate work.
* A process killed mid-write leaves at most one torn (newline-less) trailing line; readers ignore it and the
  writer truncates it before appending.
* Failures are written only to the errors file (study id, exception type, message, attempt count) and the
  study stays pending, so the next run retries it. Error text never reaches an output line.
* Sharding is a deterministic strided split of the *full* input list (``items[rank::world]``), computed before
  looking at finished work, so every process agrees on ownership even while others are writing.
* A rerun whose ``run_info`` differs from the recorded one (another model, prompt...) is refused, so outputs
  of two configurations are never mixed in one folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text, named_os_error

logger = logging.getLogger(__name__)

PARTS_DIRNAME = "parts"
RUN_INFO_NAME = "run_info.json"

BatchFn = Callable[[list[dict]], Sequence[Any]]


@dataclass
class RunSummary:
    """What one call of :func:`run_resumable` did on this process.

    ``merged_path`` is set only on the process that wrote the merged file (the single process, or the main
    process under ``accelerate launch``): that process alone should post-process the merged output.
    """

    rank: int
    world_size: int
    n_items: int
    n_shard: int
    n_skipped: int
    n_done: int
    part_path: Path
    errors_path: Path
    merged_path: Path | None = None
    failed_ids: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        """Number of studies that failed in this call (see ``failed_ids``)."""
        return len(self.failed_ids)


def part_path(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Path of the output part written by ``rank`` out of ``world_size`` processes.

    Args:
        out_dir: the runner's output folder.
        rank: process index.
        world_size: number of processes.
    """
    return Path(out_dir) / PARTS_DIRNAME / f"part-{rank:05d}-of-{world_size:05d}.jsonl"


def errors_path(out_dir: str | os.PathLike, rank: int) -> Path:
    """Path of the failure log written by ``rank``.

    Args:
        out_dir: the runner's output folder.
        rank: process index.
    """
    return Path(out_dir) / PARTS_DIRNAME / f"errors-{rank:05d}.jsonl"


def read_jsonl(path: str | os.PathLike, repair: bool = False, strict: bool = False) -> list[dict]:
    """Read a JSONL file of JSON objects.

    Two modes: files written by this runner (default) may end in a torn line left by a killed process, which
    is ignored (and truncated with ``repair=True``); a missing file reads as empty and blank lines are skipped.
    With ``strict=True`` (files written by people or other tools) a missing file, a blank line or a bad last
    line is an error, and a last line without a trailing newline is an ordinary line.

    Args:
        path: the file.
        repair: runner mode only: truncate a torn (newline-less) trailing line from the file so appends start
            on a clean line boundary.
        strict: see above.

    Returns:
        The parsed objects, in file order.

    Raises:
        FileNotFoundError: ``strict`` and the file does not exist.
        ValueError: a line is not a JSON object (or is blank, when ``strict``); the message is
            ``<path>:<line>: ...``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a JSONL file")
    if not path.is_file():
        if strict:
            raise FileNotFoundError(f"JSONL file not found: {path}")
        return []
    data = path.read_bytes()
    if strict:
        cut = len(data)
    else:
        cut = data.rfind(b"\n") + 1  # 0 when there is no newline at all
        if cut < len(data):
            logger.warning("%s: ignoring torn trailing line (%d bytes) from an interrupted run", path, len(data) - cut)
            if repair:
                with open(path, "r+b") as fh:
                    fh.truncate(cut)
                    fh.flush()
                    os.fsync(fh.fileno())
    try:
        text = data[:cut].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {data[exc.start]:#04x})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if strict:
                raise ValueError(f"{path}:{lineno}: blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it; on any write error (disk full...) the file is cut back to its previous
    end, so the resume state stays exactly the records written before, and the error names the file."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        if start is not None:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # a torn last line is still ignored and repaired by read_jsonl on the next run
        raise named_os_error(exc, path, "append to", "the records written before are intact: rerun to resume") from exc
    finally:
        os.close(fd)


def load_finished(out_dir: str | os.PathLike, merged_name: str, key: str = "study_id") -> dict[str, dict]:
    """All finished records under ``out_dir`` (merged file first, then every part), first occurrence wins.

    Args:
        out_dir: the runner's output folder.
        merged_name: file name of the merged output inside ``out_dir``.
        key: the id field.

    Raises:
        ValueError: a record has no ``key`` field (the message names the file and line).
    """
    out_dir = Path(out_dir)
    finished: dict[str, dict] = {}
    sources = [out_dir / merged_name, *sorted((out_dir / PARTS_DIRNAME).glob("part-*.jsonl"))]
    for src in sources:
        for lineno, rec in enumerate(read_jsonl(src), start=1):
            if key not in rec:
                raise ValueError(f"{src}:{lineno}: record has no '{key}' field")
            finished.setdefault(str(rec[key]), rec)
    return finished


def load_errors(out_dir: str | os.PathLike, key: str = "study_id") -> dict[str, dict]:
    """Latest failure record per study id across every ``errors-*.jsonl`` under ``out_dir``.

    Args:
        out_dir: the runner's output folder.
        key: the id field.

    Raises:
        ValueError: a record has no ``key`` field (the message names the file and line).
    """
    latest: dict[str, dict] = {}
    for src in sorted((Path(out_dir) / PARTS_DIRNAME).glob("errors-*.jsonl")):
        for lineno, rec in enumerate(read_jsonl(src), start=1):
            if key not in rec:
                raise ValueError(f"{src}:{lineno}: record has no '{key}' field")
            sid = str(rec[key])
            if sid not in latest or rec.get("attempt", 0) >= latest[sid].get("attempt", 0):
                latest[sid] = rec
    return latest


def shard_items(items: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """Deterministic strided shard ``items[rank::world_size]``.

    Args:
        items: the full input list.
        rank: process index, ``0 <= rank < world_size``.
        world_size: number of processes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid shard: rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def get_shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, Any]:
    """Resolve (rank, world_size, state).

    Args:
        rank: explicit rank (e.g. a SLURM array index); must be given together with ``world_size``.
        world_size: explicit number of shards.

    Returns:
        ``(rank, world_size, state)`` where ``state`` is an ``accelerate.PartialState`` when the values came
        from accelerate (so callers can ``wait_for_everyone()``), else None.
    """
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size must be given together")
    if rank is not None:
        return int(rank), int(world_size), None
    import torch
    from accelerate import PartialState

    # Without cpu=True, PartialState on a GPU-less machine ignores the launcher and reports one process,
    # which would make every process redo the whole list.
    state = PartialState(cpu=not torch.cuda.is_available())
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != env_world:
        raise RuntimeError(f"accelerate reports {state.num_processes} processes but WORLD_SIZE={env_world}; "
                           "refusing to run unsharded")
    return state.process_index, state.num_processes, state


def finish_distributed() -> None:
    """Barrier + ``destroy_process_group`` at the end of a launched script; a no-op without a process group.

    Without both, a multi-process run aborts at exit now and then (HF_NOTES §6).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def add_runner_arguments(parser: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """Add the runner's command-line options: ``--batch_size``, ``--rank``, ``--world_size``.

    Args:
        parser: the script's parser.
        batch_size: default of ``--batch_size``.
    """
    parser.add_argument("--batch_size", type=int, default=batch_size, help="studies per batch")
    parser.add_argument("--rank", type=int, default=None,
                        help="explicit shard index (with --world_size, e.g. a SLURM array); default: accelerate")
    parser.add_argument("--world_size", type=int, default=None, help="explicit number of shards (with --rank)")


def check_run_info(out_dir: str | os.PathLike, run_info: dict) -> None:
    """Record ``run_info`` in ``out_dir/run_info.json`` on the first run; refuse a rerun with a different one.

    Concurrent processes of one run write identical content atomically, so the order does not matter.

    Args:
        out_dir: the runner's output folder (must exist).
        run_info: JSON-serialisable description of what produces the outputs.

    Raises:
        ValueError: the recorded description differs; the message names the differing fields.
    """
    path = Path(out_dir) / RUN_INFO_NAME
    current = json.loads(json.dumps(run_info))
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable run description ({exc}); it was edited or damaged: restore it "
                             "or use another output folder") from None
        if recorded != current:
            fields = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            raise ValueError(f"{path}: this folder holds outputs of another configuration (fields {fields} differ: "
                             f"recorded {[recorded.get(k) for k in fields]}, now {[current.get(k) for k in fields]}); "
                             "use another output folder")
        return
    atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def merge_parts(
    out_dir: str | os.PathLike,
    order: Iterable[str],
    merged_name: str = "merged.jsonl",
    key: str = "study_id",
) -> Path:
    """Merge every part (and any previous merged file) into ``out_dir/merged_name``.

    Each study appears exactly once (first record wins), ordered by ``order`` (the input order); finished
    studies not in ``order`` follow in the order they were found. Written atomically (temp file + rename).

    Args:
        out_dir: the runner's output folder.
        order: study ids in input order.
        merged_name: output file name inside ``out_dir``.
        key: the id field.
    """
    out_dir = Path(out_dir)
    finished = load_finished(out_dir, merged_name, key=key)
    ordered = list(dict.fromkeys([sid for sid in map(str, order) if sid in finished] + list(finished)))
    merged = atomic_write_text(out_dir / merged_name,
                               "".join(json.dumps(finished[sid], ensure_ascii=False) + "\n" for sid in ordered))
    logger.info("merged %d studies into %s", len(ordered), merged)
    return merged


def _process_with_fallback(fn: BatchFn, batch: list[dict]) -> list[Any]:
    """Run ``fn`` on a batch; if the whole batch raises, retry item by item so one bad item fails alone."""
    try:
        results = list(fn(batch))
    except Exception as exc:  # noqa: BLE001 - recorded per study in the errors file, on purpose
        if len(batch) == 1:
            return [exc]
        logger.warning("batch of %d failed (%s: %s); retrying one item at a time", len(batch), type(exc).__name__,
                       exc)
        return [_process_with_fallback(fn, [item])[0] for item in batch]
    if len(results) != len(batch):
        raise ValueError(f"batch function returned {len(results)} results for {len(batch)} items")
    return results


def _validated_ids(items: Sequence[dict], key: str) -> list[str]:
    ids = []
    for i, item in enumerate(items):
        if key not in item:
            raise ValueError(f"item {i} has no '{key}' field")
        ids.append(str(item[key]))
    dup = sorted(s for s, c in Counter(ids).items() if c > 1)
    if dup:
        raise ValueError(f"duplicate {key} values in input: {dup[:5]}")
    return ids


def run_resumable(
    items: Sequence[dict],
    process_batch: BatchFn,
    out_dir: str | os.PathLike,
    *,
    key: str = "study_id",
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    merged_name: str = "merged.jsonl",
    merge: bool = True,
    max_attempts: int | None = None,
    run_info: dict | None = None,
) -> RunSummary:
    """Process every pending item of this process's shard, appending one JSON line per finished study.

    Args:
        items: input records, each a dict with a unique ``key`` (e.g. ``study_id``); their order is the
            merged output order.
        process_batch: ``fn(list_of_items) -> list`` returning, per item, a JSON-serialisable dict (the
            result; ``key`` is added) or an ``Exception`` instance (a failure). An exception raised by the
            whole call is retried item by item. Exceptions may carry a ``details`` dict (e.g. raw model
            output) that is stored in the errors file.
        out_dir: output folder (created).
        key: id field of the items.
        batch_size: number of pending items handed to ``process_batch`` at once.
        rank: explicit shard index (with ``world_size``); default: from ``accelerate.PartialState``.
        world_size: explicit number of shards.
        merged_name: file name of the merged output inside ``out_dir``.
        merge: merge parts when done. Under accelerate the main process merges after ``wait_for_everyone()``;
            with explicit rank/world_size only a single-shard run (world_size == 1) merges, otherwise rerun
            with world_size 1 (which redoes nothing finished) or call :func:`merge_parts` once every shard
            has finished.
        max_attempts: studies whose recorded failures reach this count are skipped (left unfinished)
            instead of retried; None retries every failure on every run.
        run_info: description of what produces the outputs; see :func:`check_run_info`.

    Returns:
        A :class:`RunSummary` for this process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _validated_ids(items, key)
    rank, world_size, state = get_shard_info(rank, world_size)
    out_dir = Path(out_dir)
    (out_dir / PARTS_DIRNAME).mkdir(parents=True, exist_ok=True)
    if run_info is not None:
        check_run_info(out_dir, run_info)
    my_part = part_path(out_dir, rank, world_size)
    my_errors = errors_path(out_dir, rank)
    # Repair only our own files: other processes may be appending to theirs right now.
    read_jsonl(my_part, repair=True)
    read_jsonl(my_errors, repair=True)

    shard = shard_items(items, rank, world_size)
    finished = load_finished(out_dir, merged_name, key=key)
    errors = load_errors(out_dir, key=key)
    pending = [item for item in shard if str(item[key]) not in finished
               and (max_attempts is None or errors.get(str(item[key]), {}).get("attempt", 0) < max_attempts)]
    n_skipped = len(shard) - len(pending)
    logger.info("rank %d/%d: %d items in shard, %d already done or given up, %d pending",
                rank, world_size, len(shard), n_skipped, len(pending))

    n_done, failed_ids = 0, []
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        for item, res in zip(batch, _process_with_fallback(process_batch, batch)):
            sid = str(item[key])
            if isinstance(res, BaseException):
                attempt = errors.get(sid, {}).get("attempt", 0) + 1
                rec = {key: sid, "error_type": type(res).__name__, "message": str(res), "attempt": attempt}
                details = getattr(res, "details", None)
                if details is not None:
                    rec["details"] = details
                errors[sid] = rec
                _append_jsonl(my_errors, rec)
                failed_ids.append(sid)
                logger.warning("%s %s failed (attempt %d): %s: %s", key, sid, attempt, type(res).__name__, res)
                continue
            if not isinstance(res, dict):
                raise TypeError(f"process_batch returned {type(res).__name__} for {key} {sid}; "
                                "expected dict or Exception")
            if key in res and str(res[key]) != sid:
                raise ValueError(f"process_batch returned {key}={res[key]!r} for item {sid!r}")
            _append_jsonl(my_part, {key: sid, **{k: v for k, v in res.items() if k != key}})
            n_done += 1

    merged = None
    if merge and state is not None and state.num_processes > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            merged = merge_parts(out_dir, ids, merged_name, key=key)
        # Nobody reads the merged file before it is complete.
        state.wait_for_everyone()
    elif merge and world_size == 1:
        merged = merge_parts(out_dir, ids, merged_name, key=key)
    return RunSummary(rank=rank, world_size=world_size, n_items=len(items), n_shard=len(shard),
                      n_skipped=n_skipped, n_done=n_done, part_path=my_part, errors_path=my_errors,
                      merged_path=merged, failed_ids=failed_ids)


def run_from_args(
    args: argparse.Namespace,
    items: Sequence[dict],
    process_batch: BatchFn,
    out_dir: str | os.PathLike,
    *,
    merged_name: str,
    run_info: dict,
    on_merged: Callable[[Path], Any],
) -> RunSummary:
    """The command-line scripts' run: :func:`run_resumable` with the options of :func:`add_runner_arguments`.

    ``on_merged(merged_path)`` runs on the merging process only (to write final outputs); every process ends
    with :func:`finish_distributed`, also when something raised.

    Args:
        args: parsed arguments with ``batch_size``, ``rank`` and ``world_size``.
        items: input records (see :func:`run_resumable`).
        process_batch: see :func:`run_resumable`.
        out_dir: output folder.
        merged_name: merged file name inside ``out_dir``.
        run_info: see :func:`check_run_info`.
        on_merged: post-processing of the merged file.
    """
    try:
        summary = run_resumable(items, process_batch, out_dir, batch_size=args.batch_size, rank=args.rank,
                                world_size=args.world_size, merged_name=merged_name, run_info=run_info)
        logger.info("rank %d/%d: %d done, %d failed, %d skipped", summary.rank, summary.world_size,
                    summary.n_done, summary.n_failed, summary.n_skipped)
        if summary.merged_path is not None:
            on_merged(summary.merged_path)
    finally:
        finish_distributed()
    return summary


__all__ = [
    "RUN_INFO_NAME",
    "RunSummary",
    "add_runner_arguments",
    "check_run_info",
    "errors_path",
    "finish_distributed",
    "get_shard_info",
    "load_errors",
    "load_finished",
    "merge_parts",
    "part_path",
    "read_jsonl",
    "run_from_args",
    "run_resumable",
    "shard_items",
]
