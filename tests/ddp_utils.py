"""Run a function in 2 gloo processes (CPU) and collect what each rank returns; a deadlock fails instead of hanging.

Usage in a test:
    results = run_ddp(my_fn, world_size=2, args=(a, b))   # my_fn(rank, world_size, *args) -> picklable
The function must be importable at module level (a top-level def in a test module or a package module).
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str, timeout_s: float):
    import datetime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_ddp(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0) -> list:
    """Returns [result of rank 0, result of rank 1, ...]; raises with the failing rank's traceback."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out, timeout_s),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception:
            errors = []
            for r in range(world_size):
                f = Path(out) / f"rank{r}.pt"
                if f.exists():
                    rec = torch.load(f, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("DDP worker failed:\n" + "\n".join(errors or ["(no traceback recorded)"]))
        results = []
        for r in range(world_size):
            rec = torch.load(Path(out) / f"rank{r}.pt", weights_only=False)
            results.append(rec["result"])
        return results
