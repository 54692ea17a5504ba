"""training.distributed: the gathering of a sharded evaluation's parts (moved here from tests/test_det_metrics.py with
the function, which was util.det_metrics.gather_records: collectives live in training/)."""
import json

import pytest

from helpers import run_two_processes
from training.distributed import gather_shards


def test_gathering_without_processes_keeps_the_records_and_refuses_repeats():
    records = [{"image_id": 1, "category_id": 5, "bbox": [4.0, 4.0, 20.0, 20.0], "score": 0.9}]
    assert gather_shards(records, [1, 2]) == (records, [1, 2])
    with pytest.raises(ValueError, match=r"more than once.*\[2\]"):
        gather_shards(records, [1, 2, 2])


DDP_SCRIPT = """
import datetime, json, os
import torch.distributed as dist
from training.distributed import gather_shards

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
image_ids = list(range(1, 8))[rank::world]  # a disjoint shard, no padding (as ShardSampler)
records = [{"image_id": i, "category_id": 1, "bbox": [0, 0, i, i], "score": 0.5} for i in image_ids for _ in range(i)]
records, image_ids = gather_shards(records, image_ids)
print(json.dumps([sorted(image_ids), sorted(r["image_id"] for r in records)]))
dist.destroy_process_group()
"""


def test_records_of_every_process_are_gathered_exactly_once():
    lines = run_two_processes(DDP_SCRIPT)
    expected = [list(range(1, 8)), sorted(i for i in range(1, 8) for _ in range(i))]
    for line in lines:
        assert json.loads(line) == expected
