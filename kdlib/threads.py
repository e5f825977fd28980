"""The CPU threads of one machine, shared by the processes that train on it at once.

A sweep's local workers (``search/sweep.py``) split the machine's threads between them. A worker with
no trial left to start waits for the others' trials, and its threads would idle while the last trials
train alone. So the processes of a share count those training now, and the training loop takes its
part (the machine's threads over the processes training) between two steps: the last trial of a sweep
on 2 cores trains on both. Outside a share a process's threads stay as they are.

Which share a process is in is process-wide, as the thread count it steers is (``torch.set_num_threads``):
the training loop finds it here rather than through every job's arguments.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized

import torch


@dataclass(frozen=True)
class Share:
    threads: int  # the machine's threads, split between the processes training
    training: Synchronized  # how many of the share's processes train now: an int in shared memory

    @classmethod
    def of(cls, threads: int, processes: int) -> Share:
        """A share of ``threads`` for ``processes`` processes, each counted as training until it rests.
        It reaches the other processes as an argument of their start (``multiprocessing``'s spawn)."""
        return cls(threads, multiprocessing.get_context("spawn").Value("i", processes))

    def part(self, training: int | None = None) -> int:
        """The threads of one process that trains: the machine's over the processes training (those
        training now, or ``training``), at least one."""
        return max(1, self.threads // max(1, self.training.value if training is None else training))

    def count(self, change: int) -> None:
        with self.training.get_lock():
            self.training.value += change


_share: Share | None = None
_resting = False


@contextlib.contextmanager
def joined(share: Share) -> Iterator[None]:
    """This process trains in ``share`` while inside, with its part of the threads; leaving, it rests."""
    global _share, _resting
    _share, _resting = share, False
    torch.set_num_threads(share.part())
    try:
        yield
    finally:
        rest()
        _share = None


def rest() -> None:
    """This process trains nothing for now (it waits, or is done): its threads go to those that train."""
    global _resting
    if _share is not None and not _resting:
        _share.count(-1)
        _resting = True


def resume() -> None:
    """This process trains again: it counts among those training, from the next step on."""
    global _resting
    if _share is not None and _resting:
        _share.count(+1)
        _resting = False


def take_part() -> None:
    """Between two training steps: this process's part of its share's threads, if it is in one."""
    if _share is not None and (part := _share.part()) != torch.get_num_threads():
        torch.set_num_threads(part)
        print(
            f"threads: this process trains on {part} of the {_share.threads} threads now ({_share.training.value} of its sweep's processes training)",
            flush=True,
        )
