"""Archive-scale prediction under `torchrun`: a deterministic shard per rank, a resumable part file per rank,
and one merge on rank 0 into the CSV a single process would have written.

`torchrun --nproc_per_node N -m medvit predict ... --out preds.csv` (and multi-node the same way): rank r
takes every N-th file of the sorted input list, appends its rows to `.preds.csv.part-r-of-N` after every
batch, and rank 0 merges the parts in the input order once all ranks are done. A rank that dies leaves its
part behind; the same command with `--resume` then continues every rank where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medvit._io import atomic_write_bytes
from medvit.errors import MedvitError
from medvit.inference.batch import CSV_COLUMNS

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place in a `torchrun` job (rank 0 of 1 when run alone)."""

    rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> Shard:
        """RANK / WORLD_SIZE as torchrun sets them; validated, since a bad value would silently drop files."""
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise MedvitError("RANK and WORLD_SIZE must be integers (they are set by torchrun)") from None
        if world < 1 or not 0 <= rank < world:
            raise MedvitError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
        return cls(rank, world)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def select(self, paths: Sequence[Path]) -> list[Path]:
        """Every world_size-th file from this rank on: the same split on every rank and every rerun."""
        return list(paths)[self.rank :: self.world_size]

    def part(self, out: Path) -> Path:
        return part_path(out, self.rank, self.world_size)


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Hidden next to the final CSV, so a merge is a rename within one file system."""
    return out.with_name(f".{out.name}.part-{rank}-of-{world_size}")


def stale_parts(out: Path) -> list[Path]:
    """Part files of an interrupted job with any number of ranks."""
    return sorted(out.parent.glob(f".{out.name}.part-*-of-*"))


def merge_parts(out: Path, paths: Sequence[Path], world_size: int, *, keep_existing: bool = False) -> int:
    """Concatenate the ranks' parts in the order of `paths` (the single-process order); returns the row count.

    With `keep_existing` (a resumed job), rows already in `out` are kept and its files were skipped by the ranks.

    Raises:
        MedvitError: a part is missing or does not cover its shard (a rank died without --resume).
    """
    parts = [part_path(out, r, world_size) for r in range(world_size)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise MedvitError(f"cannot merge {out.name}: missing part file(s) {', '.join(missing)}; rerun with --resume")
    sources = [*parts, *([out] if keep_existing and out.is_file() else [])]
    rows = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in sources], ignore_index=True)
    order = {str(p): i for i, p in enumerate(paths)}
    uncovered = set(order) - set(rows["file"])
    if uncovered:
        raise MedvitError(f"cannot merge {out.name}: {len(uncovered)} file(s) have no rows; rerun with --resume")
    rows = rows.assign(_order=rows["file"].map(order)).sort_values("_order", kind="stable")
    csv = rows.reindex(columns=list(CSV_COLUMNS)).to_csv(index=False)
    atomic_write_bytes(out, csv.encode())
    for p in parts:
        p.unlink()
    _log.info("merged %d part(s) into %s (%d rows)", world_size, out, len(rows))
    return len(rows)
