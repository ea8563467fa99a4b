"""How the training data is shared out between processes (train/batches.py): disjoint shares whose union is the
one-process order, refills of skipped samples from the same share with exact counts, the skip-rate stop, resume of
every shard's position, and the refusal of a layout a checkpoint's position does not fit."""

import csv
import itertools
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from train import sft
from train.batches import (
    SKIP_CHECK_AFTER, DataLayout, DataState, ShardedBatches, TooManySkippedError, read_position,
)

N = 50


def dataset(bad=()):
    return [{"id": f"s{i}", "bad": i in bad} for i in range(N)]


def encode(sample):
    return (None, "unreadable_image") if sample["bad"] else (sample["id"], None)


def collate(ids):
    return {"ids": list(ids)}


def stream(data, layout, rank=0, state=None, **kwargs):
    state = state if state is not None else DataState.start(layout)
    return ShardedBatches(data, encode, collate, layout, rank, state, **kwargs)


def take(batches, count):
    """(shard, position after it, sample ids) of the next `count` batches."""
    out = []
    for batch in itertools.islice(batches, count):
        shard, position = read_position(batch["data_position"])
        out.append((shard, position, batch["ids"]))
    return out


def consumed(state: DataState, rank: int, taken):
    """Move the run's data position past `taken` batches of `rank`, as the trainer does."""
    for shard, position, _ in taken:
        state.shards[shard] = position
        state.batches[rank] += 1


def test_two_processes_read_disjoint_shares_whose_union_is_the_one_process_order():
    data = dataset()
    one = DataLayout(world_size=1, num_workers=1, batch_size=3, seed=7)
    two = DataLayout(world_size=2, num_workers=1, batch_size=3, seed=7)
    single = [ids for _, _, ids in take(iter(stream(data, one)), 8)]  # 4 steps of gradient accumulation 2
    rank0 = [ids for _, _, ids in take(iter(stream(data, two, rank=0)), 4)]
    rank1 = [ids for _, _, ids in take(iter(stream(data, two, rank=1)), 4)]
    assert not set(sum(rank0, [])) & set(sum(rank1, []))
    for step in range(4):  # step k of rank r is micro-batch 2k + r of the one-process run: same global batches
        assert rank0[step] == single[2 * step] and rank1[step] == single[2 * step + 1]
    assert sorted(sum(single[:8], [])) != [f"s{i}" for i in range(24)]  # shuffled, not in file order
    epoch = [ids for _, _, ids in take(iter(stream(data, one)), 17)]  # past one epoch: each sample once per epoch
    first = sum(epoch, [])[:N]
    assert sorted(first) == sorted(s["id"] for s in data)
    assert sum(epoch, [])[N:] != first[:len(sum(epoch, [])) - N]  # the next epoch has its own order


def test_skipped_samples_are_refilled_from_the_same_share_and_counted_exactly():
    bad = {3, 4, 5, 6, 11, 30}
    data = dataset(bad)
    layout = DataLayout(world_size=2, num_workers=1, batch_size=1, seed=1)  # batch size 1: a skip empties a batch
    shares = {rank: take(iter(stream(data, layout, rank=rank)), 20) for rank in (0, 1)}
    for rank, taken in shares.items():
        assert all(len(ids) == 1 for _, _, ids in taken)  # every batch full
        shard, last, _ = taken[-1]
        assert shard == rank
        used = [ids[0] for _, _, ids in taken]
        # Everything read was trained on or skipped, and the skip count is exactly the bad samples read.
        read = [data[stream(data, layout).sample_index(layout.stream_position(rank, c))]["id"]
                for c in range(last.cursor)]
        assert [s for s in read if s not in {f"s{i}" for i in bad}] == used
        assert last.skipped.get("unreadable_image", 0) == sum(s in {f"s{i}" for i in bad} for s in read)
    assert not {ids[0] for _, _, ids in shares[0]} & {ids[0] for _, _, ids in shares[1]}
    assert sum(shares[r][-1][1].num_skipped for r in (0, 1)) >= 1  # the test did meet bad samples


def test_too_many_skips_stop_the_run_with_the_counts():
    layout = DataLayout(world_size=1, num_workers=1, batch_size=2, seed=0)
    with pytest.raises(TooManySkippedError, match=rf"{SKIP_CHECK_AFTER} of the {SKIP_CHECK_AFTER} samples .*"
                                                  r"--max-skip-fraction 0.1"):
        next(iter(stream(dataset(bad=range(N)), layout)))  # nothing usable: stops, never loops forever
    half_bad = dataset(bad=range(0, N, 2))
    with pytest.raises(TooManySkippedError):
        take(iter(stream(half_bad, layout)), 200)
    assert len(take(iter(stream(half_bad, layout, max_skip_fraction=0.6)), 200)) == 200


def test_resume_continues_every_shard_where_it_stopped():
    data = dataset(bad={2, 9, 17})
    layout = DataLayout(world_size=2, num_workers=1, batch_size=2, seed=3)
    straight = {rank: take(iter(stream(data, layout, rank=rank)), 10) for rank in (0, 1)}
    state = DataState.start(layout)
    for rank in (0, 1):
        consumed(state, rank, take(iter(stream(data, layout, rank=rank)), 4))
    saved = state.to_dict()
    assert saved["samples_read"] == sum(straight[r][3][1].cursor for r in (0, 1))
    restored = DataState.from_dict(saved, layout)
    for rank in (0, 1):
        assert take(iter(stream(data, layout, rank=rank, state=restored)), 6) == straight[rank][4:]


def test_loader_workers_take_turns_and_resume_in_turn():
    data = dataset(bad={5})
    layout = DataLayout(world_size=1, num_workers=2, batch_size=2, seed=4)

    def loader(state):
        return iter(DataLoader(stream(data, layout, state=state), batch_size=None, num_workers=2))

    straight = take(loader(DataState.start(layout)), 7)
    assert [shard for shard, _, _ in straight] == [0, 1, 0, 1, 0, 1, 0]
    state = DataState.start(layout)
    consumed(state, 0, straight[:3])  # stopped after an odd number of batches: worker 1's shard is next
    assert take(loader(DataState.from_dict(state.to_dict(), layout)), 4) == straight[3:]


def test_a_position_written_by_another_layout_is_refused_with_what_to_do():
    saved = DataState.start(DataLayout(world_size=2, num_workers=1, batch_size=2, seed=0)).to_dict()
    with pytest.raises(ValueError, match=r"world_size 2 → 1.*deepspeed --num_gpus 2.*--init-from <checkpoint> "
                                         r"--resume no"):
        DataState.from_dict(saved, DataLayout(world_size=1, num_workers=1, batch_size=2, seed=0))
    with pytest.raises(ValueError, match=r"batch_size 2 → 4.*--per-device-train-batch-size 2"):
        DataState.from_dict(saved, DataLayout(world_size=2, num_workers=1, batch_size=4, seed=0))
    assert DataState.from_dict(saved, DataLayout(world_size=2, num_workers=1, batch_size=2, seed=0)).shards[1].cursor == 0


def test_stream_positions_cover_the_stream_once():
    layout = DataLayout(world_size=2, num_workers=3, batch_size=4, seed=0)
    positions = [layout.stream_position(shard, cursor) for shard in range(6) for cursor in range(40)]
    assert sorted(positions) == list(range(240))
    assert torch.tensor(positions).unique().numel() == 240


# ---------------------------------------------------------------------------------------------------- in a run

@pytest.fixture(scope="module")
def llava_data(tmp_path_factory, random_tiny_tokenizer):
    """A random tiny tokenizer and a LLaVA JSON of five readable images and one corrupt one."""
    from unimodal.shapesworld import ShapesWorld

    root = tmp_path_factory.mktemp("refill")
    shutil.copytree(random_tiny_tokenizer, root / "tokenizer")
    (root / "images").mkdir()
    world = ShapesWorld("train", size=64, num_samples=5, seed=5)
    for i in range(5):
        world[i].image.save(root / "images" / f"{i}.png")
    (root / "images" / "broken.png").write_bytes(b"GIF89a truncated")
    names = [f"{i}.png" for i in range(5)] + ["broken.png"]
    (root / "llava.json").write_text(json.dumps([
        {"id": name.split(".")[0], "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "shapes"}]}
        for name in names]))
    return root


def refill_argv(root, output, *extra):
    return ["--use-cpu", "true", "--bf16", "false", "--deepspeed", "none", "--tokenizer", str(root / "tokenizer"),
            "--backbone", "shapesworld-tiny", "--init-from", "none", "--output-dir", str(output),
            "--data", f"llava:{root / 'llava.json'}", "--image-folder", str(root / "images"),
            "--per-device-train-batch-size", "1", "--max-steps", "9", "--save-steps", "9", "--logging-steps", "1",
            "--report-to", "none", "--num-sample-prompts", "1", "--record-sample-ids", "true", *extra]


def test_a_corrupt_image_at_batch_size_1_is_refilled_and_counted(llava_data):
    """Nine steps of one sample over six records: the corrupt one is met at least once; the run goes on, never
    trains on it, and counts it exactly."""
    output = llava_data / "sft"
    sft.main(refill_argv(llava_data, output, "--max-skip-fraction", "0.5"))
    rows = [json.loads(line) for line in (output / "sample_ids" / "rank-0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10)) and all(len(r["ids"]) == 1 for r in rows)
    assert "broken" not in {r["ids"][0] for r in rows}
    marker = json.loads((output / "checkpoint-9" / "checkpoint_complete.json").read_text())
    read = marker["data"]["samples_read"]
    assert marker["skipped"] == {"unreadable_image": read - 9} and read - 9 >= 1  # 9 positions in 1.5 epochs
    with open(output / "train_log.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["skipped_unreadable_image"]) == read - 9 and int(last["samples_read"]) == read


def test_a_run_over_too_much_unusable_data_stops_with_the_counts(llava_data, monkeypatch):
    monkeypatch.setattr("train.batches.SKIP_CHECK_AFTER", 12)  # check early: a sixth of the records is corrupt
    with pytest.raises(TooManySkippedError, match=r"were unusable \({'unreadable_image': \d+}\), more than "
                                                  r"--max-skip-fraction 0.01"):
        sft.main(refill_argv(llava_data, llava_data / "sft-strict", "--max-skip-fraction", "0.01",
                             "--max-steps", "200"))
