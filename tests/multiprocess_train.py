"""``emguard.train`` in one process of a multi-process launch (run by ``torchrun`` from test_multiprocess.py).

Every write emguard makes to a run directory (atomic files, the adapter directory, checkpoint
removal) is recorded per process in ``SPY_DIR/rank<R>.jsonl``, so the test can check that only the
main process wrote. With ``--kill-rank R --kill-step S`` process R kills itself with SIGKILL at the
end of optimizer step S, as a crashed GPU worker would.

    torchrun --standalone --nproc_per_node 2 tests/multiprocess_train.py CONFIG.yaml SPY_DIR \
        [--kill-rank R --kill-step S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

import emguard.fsio
import emguard.training
from emguard.config import load_config
from emguard.rundir import RunDir

RANK = int(os.environ.get("RANK", "0"))


def spy(spy_dir: Path) -> None:
    log = spy_dir / f"rank{RANK}.jsonl"

    def record(op: str, path: object) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"rank": RANK, "op": op, "path": str(path)}) + "\n")

    write_bytes = emguard.fsio.atomic_write_bytes

    def spied_write_bytes(path, data):  # noqa: ANN001, ANN202
        record("write", path)
        return write_bytes(path, data)

    emguard.fsio.atomic_write_bytes = spied_write_bytes
    directory = emguard.training.atomic_directory

    @contextlib.contextmanager
    def spied_directory(path):  # noqa: ANN001, ANN202
        record("directory", path)
        with directory(path) as tmp:
            yield tmp

    emguard.training.atomic_directory = spied_directory
    for name in ("clear", "remove_checkpoints", "truncate_train_log"):
        original = getattr(RunDir, name)

        def spied(self, *args, _original=original, _name=name):  # noqa: ANN001, ANN202
            record(_name, self.path)
            return _original(self, *args)

        setattr(RunDir, name, spied)


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("spy_dir", type=Path)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-step", type=int)
    a = parser.parse_args()
    spy(a.spy_dir)
    callbacks = [KillAt(a.kill_step)] if a.kill_rank == RANK else []
    result = emguard.training.train(load_config(a.config), progress=False, callbacks=callbacks)
    print(json.dumps({"rank": RANK, **result.summary()}))


if __name__ == "__main__":
    main()
