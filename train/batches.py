"""Each process's stream of training batches: one seeded order over the data set, shared out between processes in
blocks, with every unusable sample replaced by the next one of the same share and counted.

Order: epoch e of the stream is a permutation of the data set seeded by (seed, e), and the epochs follow each other
without end, so stream position p is sample `permutation(p // N)[p % N]` of a data set of N samples (the run's
length is `--max-steps`).

Shares: the stream is cut into blocks of `batch_size` positions. With S shards (processes × data-loader workers per
process), shard s takes blocks s, s + S, s + 2S, ...: no two shards ever read the same position, and a shard that
skips a sample takes the next position of its own share, so the refill never touches another shard's samples. When
nothing is skipped, micro-batch k of shard s is exactly block k·S + s, which is what a one-process run with
gradient accumulation S reads as its k·S + s-th micro-batch: the same global batches in the same order.

Position: a shard's cursor is how many positions of its share it has read (used or skipped). The cursors of all
shards, saved with each checkpoint, are where a resumed run continues; they hold only for the same number of shards
and the same batch size, which `DataLayout.check_resume` enforces.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable_image", "too_long", "unsupervised")
# The skip-rate check starts once a shard has read this many positions (a few bad samples early on are no signal).
SKIP_CHECK_AFTER = 100


class TooManySkippedError(RuntimeError):
    """More of the data than `--max-skip-fraction` was unusable."""


@dataclass
class ShardPosition:
    """Where one shard is: positions read from its share (`cursor`) and how many of them were skipped, by reason."""

    cursor: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class DataLayout:
    """How the stream is shared out: `world_size` processes × `num_workers` data-loader workers (1 for loading in the
    main process), each reading blocks of `batch_size` (the per-device batch)."""

    world_size: int
    num_workers: int
    batch_size: int
    seed: int

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers

    def stream_position(self, shard: int, cursor: int) -> int:
        """The stream position of the `cursor`-th position of `shard`'s share."""
        block, offset = divmod(cursor, self.batch_size)
        return (block * self.num_shards + shard) * self.batch_size + offset

    def check_resume(self, saved: dict) -> None:
        """Raise ValueError unless a checkpoint's data position (`DataState.to_dict()["layout"]`) continues here."""
        changed = {k: (saved.get(k), v) for k, v in asdict(self).items() if saved.get(k) != v}
        if not changed:
            return
        described = ", ".join(f"{name} {old} → {new}" for name, (old, new) in changed.items())
        hint = {
            "world_size": f"launch {saved.get('world_size')} processes (e.g. `deepspeed --num_gpus "
                          f"{saved.get('world_size')} ...` or the same hostfile)",
            "num_workers": f"pass --dataloader-num-workers {saved.get('num_workers')}"
                           + (" (or 0)" if saved.get("num_workers") == 1 else ""),
            "batch_size": f"pass --per-device-train-batch-size {saved.get('batch_size')}",
            "seed": f"pass --data-seed {saved.get('seed')}",
        }
        raise ValueError(
            f"the checkpoint's data position was written with a different layout ({described}); each process's place "
            f"in the data cannot be carried over. To continue it exactly, {'; '.join(hint[k] for k in changed)}. "
            "To continue training its weights in the new layout instead, start a new run from the checkpoint "
            "folder: --init-from <checkpoint> --resume no (new optimizer state and data order)")


@dataclass
class DataState:
    """The data position of a whole run: its layout and every shard's position."""

    layout: DataLayout
    shards: list[ShardPosition]
    # Per process: batches it has consumed, which tells which of its workers yields the next batch.
    batches: list[int]

    @classmethod
    def start(cls, layout: DataLayout) -> DataState:
        return cls(layout, [ShardPosition() for _ in range(layout.num_shards)], [0] * layout.world_size)

    def skipped(self) -> Counter:
        total = Counter()
        for shard in self.shards:
            total.update(shard.skipped)
        return total

    def to_dict(self) -> dict:
        return {"layout": asdict(self.layout), "samples_read": sum(s.cursor for s in self.shards),
                "shards": [asdict(s) for s in self.shards], "batches": self.batches}

    @classmethod
    def from_dict(cls, saved: dict, layout: DataLayout) -> DataState:
        layout.check_resume(saved["layout"])
        return cls(layout, [ShardPosition(s["cursor"], dict(s["skipped"])) for s in saved["shards"]],
                   list(saved["batches"]))


class ShardedBatches(IterableDataset):
    """The batches of one process (rank `rank` of `layout.world_size`), read from `dataset` as the module docstring
    describes, continuing from `state`.

    Args:
        dataset: a map-style data set of conversations (any length ≥ 1).
        encode: conversation → (example, None), or (None, reason) with reason one of `SKIP_REASONS`.
        collate: list of examples → batch dict of tensors.
        layout, rank: how the stream is shared out and which process this is.
        state: the run's data position (`DataState.start(layout)` for a new run).
        max_skip_fraction: a shard that has skipped more than this fraction of what it read (after its first
            `SKIP_CHECK_AFTER` positions) stops the run with `TooManySkippedError`.
        record_ids: also put each sample's id and stream position in the batch (`sample_ids`, `stream_positions`).

    Each batch also carries `data_position`: LongTensor [2 + len(SKIP_REASONS)] = (shard, cursor, skipped by reason)
    after it, so the trainer knows the position of what it has consumed whatever the loader prefetched.
    """

    def __init__(self, dataset: Dataset, encode: Callable[[dict], tuple[Any, str | None]],
                 collate: Callable[[list], dict], layout: DataLayout, rank: int, state: DataState,
                 max_skip_fraction: float = 0.1, record_ids: bool = False):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside a world of {layout.world_size}")
        self.dataset, self.encode, self.collate = dataset, encode, collate
        self.layout, self.rank, self.state = layout, rank, state
        self.max_skip_fraction, self.record_ids = max_skip_fraction, record_ids
        self._epoch, self._permutation = -1, None

    def sample_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.layout.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(len(self.dataset), generator=generator).tolist()
        return self._permutation[offset]

    def shard_of_this_worker(self) -> int:
        """Workers take turns batch by batch (the DataLoader's order); after `batches` consumed batches, worker 0
        must play the shard whose turn is next."""
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if num_workers != self.layout.num_workers:
            raise ValueError(f"{num_workers} data-loader workers but the layout has {self.layout.num_workers}")
        turn = (worker + self.state.batches[self.rank]) % num_workers
        return self.rank * num_workers + turn

    def __iter__(self):
        shard = self.shard_of_this_worker()
        position = self.state.shards[shard]
        cursor, skipped = position.cursor, Counter(position.skipped)
        while True:
            examples, ids, positions = [], [], []
            while len(examples) < self.layout.batch_size:
                stream_position = self.layout.stream_position(shard, cursor)
                conversation = self.dataset[self.sample_index(stream_position)]
                cursor += 1
                example, reason = self.encode(conversation)
                if reason is not None:
                    skipped[reason] += 1
                    self.check_skip_rate(shard, cursor, skipped)
                    continue
                examples.append(example)
                ids.append(str(conversation.get("id", "?")))
                positions.append(stream_position)
            batch = self.collate(examples)
            batch["data_position"] = torch.tensor([shard, cursor, *(skipped[r] for r in SKIP_REASONS)])
            if self.record_ids:
                batch["sample_ids"], batch["stream_positions"] = ids, positions
            yield batch

    def check_skip_rate(self, shard: int, cursor: int, skipped: Counter) -> None:
        total = sum(skipped.values())
        if cursor >= SKIP_CHECK_AFTER and total > self.max_skip_fraction * cursor:
            raise TooManySkippedError(
                f"{total} of the {cursor} samples read by data shard {shard} were unusable ({dict(skipped)}), more "
                f"than --max-skip-fraction {self.max_skip_fraction}; fix the data (the log names each skipped "
                "sample) or raise --max-skip-fraction")


def read_position(data_position: torch.Tensor) -> tuple[int, ShardPosition]:
    """A batch's `data_position` → (shard, its position after the batch)."""
    shard, cursor, *counts = data_position.tolist()
    return shard, ShardPosition(cursor, {r: c for r, c in zip(SKIP_REASONS, counts) if c})
