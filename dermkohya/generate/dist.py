"""The ranks of one generate and what they say to each other: barriers, a shared stop flag and rank 0's
word, over torch.distributed with gloo (tiny messages; NCCL is not needed, the images go through files).

Ranks come from one of two places. `--processes N` spawns them here (one per GPU of this machine, a file
rendezvous in the output's staging folder). A launcher — `torchrun`, `accelerate launch`, a SLURM script
around them — starts them itself and says who is who in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): then this process is one rank, on `cuda:LOCAL_RANK`, and nothing is spawned.
Either way the ranks share the output folder (across nodes: a shared filesystem) and make the same files
as one process, because which rank makes which image is fixed by `run._owner`.

A rank that dies takes its sockets with it: the others fail in their next collective, and `lost` turns
that into one line naming the rank that stopped (from the `error-<rank>.txt` it left) and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dermkohya.errors import DermkohyaError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A round lasts as long as a rank's whole share of the images: hours on a large plan. A rank that dies is
# noticed at once (its sockets close); only a node that hangs without dying waits this long.
TIMEOUT = datetime.timedelta(hours=24)

T = TypeVar("T")


class RanksLost(DermkohyaError):
    """The other ranks are gone (one died, or a node was lost); said once, by each survivor."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in a launcher's job."""

    rank: int
    world: int
    local_rank: int

    @property
    def where(self) -> str:
        return f"rank {self.rank} of {self.world}"


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launcher's rank, or None outside a launcher (no WORLD_SIZE, or a world of one process)."""
    if int(_number(environ, "WORLD_SIZE", "1")) <= 1:
        return None
    missing = [key for key in LAUNCH_ENV if not environ.get(key)]
    if missing:
        raise DermkohyaError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "start dermkohya generate with torchrun or accelerate launch (they set all of "
            f"{', '.join(LAUNCH_ENV)}), or unset WORLD_SIZE to run one process"
        )
    launch = Launch(_number(environ, "RANK"), _number(environ, "WORLD_SIZE"), _number(environ, "LOCAL_RANK"))
    if not 0 <= launch.rank < launch.world or launch.local_rank < 0:
        raise DermkohyaError(f"RANK={launch.rank}, LOCAL_RANK={launch.local_rank} do not fit WORLD_SIZE={launch.world}: "
                             "check the launcher's --nnodes, --node_rank and --nproc_per_node")
    return launch


def _number(environ: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = environ.get(key, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DermkohyaError(f"{key}={value!r} in the environment is not a whole number; the launcher sets it "
                             "(torchrun, accelerate launch): do not set it by hand") from None


def launch_device(launch: Launch) -> str:
    """`cuda:LOCAL_RANK` where CUDA is, else the CPU; a LOCAL_RANK beyond this node's GPUs is refused."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DermkohyaError(
            f"{launch.where}: LOCAL_RANK={launch.local_rank} but this node sees {count} CUDA device(s)"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: start at most {count} "
            "process(es) per node (torchrun --nproc_per_node, accelerate launch --num_processes per machine)"
        )
    torch.cuda.set_device(launch.local_rank)
    return f"cuda:{launch.local_rank}"


class Group:
    """The ranks of one generate. For a single process every call is a no-op that returns at once."""

    def __init__(self, rank: int, world: int, device: str) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.staging: Path | None = None  # where each rank leaves error-<rank>.txt, once the job is known

    @classmethod
    def single(cls, device: str) -> Group:
        return cls(0, 1, device)

    @classmethod
    @contextmanager
    def spawned(cls, rank: int, world: int, device: str, init_file: Path) -> Iterator[Group]:
        """A rank of `--processes N`: a file rendezvous that only this machine's processes see."""
        _join(f"file://{init_file}", rank, world)
        try:
            yield cls(rank, world, device)
        finally:
            _leave()

    @classmethod
    @contextmanager
    def launched_from(cls, launch: Launch) -> Iterator[Group]:
        """A rank of a launcher's job: the rendezvous at MASTER_ADDR:MASTER_PORT (env://)."""
        device = launch_device(launch)
        try:
            _join("env://", launch.rank, launch.world)
        except (RuntimeError, ValueError) as exc:
            raise DermkohyaError(
                f"{launch.where}: could not join the other ranks at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} ({_first_line(exc)}); check that every node uses the same "
                "--master_addr/--master_port and that this node can reach it"
            ) from None
        try:
            yield cls(launch.rank, launch.world, device)
        finally:
            _leave()

    @property
    def where(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(lambda dist: dist.barrier())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any."""
        if self.world == 1:
            return flag

        def reduce(dist: Any) -> bool:
            import torch

            value = torch.tensor([int(flag)])
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return bool(value.item())

        return self._collective(reduce)

    def share(self, value: T) -> T:
        """Rank 0's `value` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return value

        def broadcast(dist: Any) -> T:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        return self._collective(broadcast)

    def lead(self, step: Callable[[], T]) -> T | None:
        """Rank 0 runs `step` while the others wait; if it fails, every rank stops with its message (rank 0
        raises its own error, the others a DermkohyaError quoting it). Returns `step`'s value on rank 0,
        None elsewhere."""
        value: T | None = None
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                value = step()
            except Exception as exc:  # every kind: the other ranks must not wait for rank 0 forever
                failure = exc
        message = self.share(_describe(failure) if failure is not None else None)
        if failure is not None:
            raise failure
        if message is not None:
            raise DermkohyaError(f"{self.where}: rank 0 stopped: {message}")
        return value

    def _collective(self, call: Callable[[Any], T]) -> T:
        import torch.distributed as dist

        try:
            return call(dist)
        except RuntimeError as exc:  # gloo: a peer's socket closed, or the timeout
            raise self.lost(exc) from None

    def lost(self, exc: BaseException) -> RanksLost:
        """The other ranks are gone: say which stopped and why where they left word, and how to go on."""
        said = []
        if self.staging is not None:
            for path in sorted(self.staging.glob("error-*.txt")):
                rank = path.stem.removeprefix("error-")
                if rank != str(self.rank):
                    said.append(f"rank {rank} stopped: {path.read_text(encoding='utf-8').strip()}")
        why = "; ".join(said) or (f"another rank stopped or could not be reached ({_first_line(exc)}); its own "
                                  "output says why (killed, out of memory, a lost node)")
        return RanksLost(f"{self.where}: {why}. The finished images are kept: run the same launch again to continue")

    def leave_word(self, message: str) -> None:
        """Leave this rank's error where the others (and the spawning parent) read it."""
        if self.staging is not None and self.staging.is_dir():
            from dermkohya.files import write_atomic

            write_atomic(self.staging / f"error-{self.rank}.txt", message)


def _join(init_method: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DermkohyaError) else f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
