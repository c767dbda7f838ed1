"""netprobe.distributed and netprobe.capture.gather with two gloo processes on CPU."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import netprobe
from netprobe import distributed as nd
from netprobe.capture import gather

from free_port import free_port  # noqa: E402  (tests/_helpers)


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        x = torch.randn(10, 4)
        y = torch.arange(10)
        # rank 0 takes 7 rows, rank 1 takes 3: unequal shards
        sl = slice(0, 7) if rank == 0 else slice(7, 10)
        with netprobe.probe(model, ["1", "2"], store_targets=True) as p:
            p.set_targets(y[sl])
            model(x[sl])
        got = gather(p, targets=True)
        s = nd.all_reduce_sum(torch.tensor([float(rank + 1)]))
        flags = (nd.all_true(True), nd.all_true(rank == 0))
        # a rank-local check failing on rank 1 only: every rank raises, none waits in a collective
        from netprobe.lightning import SelectivityMonitor

        def local_check():
            if rank == 1:
                raise ValueError("rank-local NaN")
            return 1

        try:
            agreed = SelectivityMonitor(["1"])._agreed(local_check, None)
        except ValueError as err:
            agreed = str(err)
        after = nd.all_reduce_sum(torch.tensor([1.0]))  # still in step
        bcast = nd.broadcast_object((torch.tensor([rank]), f"rank{rank}"))
        from netprobe.metrics import SelectivityAccumulator

        acc = SelectivityAccumulator(3)
        if rank == 0:
            acc.update(torch.rand(4, 2), torch.tensor([0, 1, 2, 0]))
        try:
            acc.all_reduce()
            empty = "no error"
        except ValueError as err:
            empty = str(err)
        after_empty = nd.all_reduce_sum(torch.tensor([1.0]))
        torch.save(
            {"rows1": got["1"][0], "t1": got["1"][1], "rows2": gather(p)["2"], "sum": s,
             "ws": nd.world_size(), "rank": nd.rank(), "flags": flags, "agreed": agreed, "after": after, "bcast": bcast, "empty": empty, "after_empty": after_empty, "scalar": nd.all_gather(torch.tensor(rank * 1.0))},
            os.path.join(outdir, f"r{rank}.pt"),
        )
    finally:
        dist.barrier()  # both ranks done with every collective before the group goes (gloo may abort otherwise)
        dist.destroy_process_group()


def test_noop_without_distributed():
    t = torch.randn(3, 2)
    assert not nd.is_distributed() and nd.world_size() == 1 and nd.rank() == 0
    assert nd.all_reduce_sum(t) is t
    assert nd.all_gather(t)[0] is t
    assert nd.all_gather_cat(t) is t
    assert nd.all_true(True) is True and nd.all_true(False) is False
    assert nd.broadcast_object(t) is t


@pytest.mark.slow
def test_two_process_gather(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(10, 4)
    ref1 = model[1](model[0](x)).detach()
    ref2 = model(x).detach()
    for r in range(2):
        out = torch.load(tmp_path / f"r{r}.pt")
        assert out["ws"] == 2 and out["rank"] == r
        torch.testing.assert_close(out["rows1"], ref1)  # rank order, unequal sizes
        torch.testing.assert_close(out["rows2"], ref2)
        assert out["t1"].tolist() == list(range(10))
        assert out["sum"].item() == 3.0
        assert [v.item() for v in out["scalar"]] == [0.0, 1.0]
        assert out["flags"] == (True, False)
        assert out["agreed"] == ("rank-local NaN" if r == 1 else "it failed on another rank (see that rank's warning)")
        assert out["after"].item() == 2.0
        assert out["bcast"][0].tolist() == [0] and out["bcast"][1] == "rank0"
        assert out["empty"].startswith("Every rank must `update`") and out["after_empty"].item() == 2.0
        assert out["empty"].endswith("(on another rank)") == (r == 0)
