"""The state directory: the database, uploaded files by content hash, one run directory per job.

STATE/emguard.db            jobs, files, events, checkpoints, keys (SQLite default)
STATE/files/ab/abcdef...    uploaded bytes, named by their SHA-256 (never by the upload's name)
STATE/jobs/ftjob-.../       the job: training.jsonl (its own copy), screen.json, run/ (the emguard
                            run directory: adapter, metrics), safety_card.json, report/
STATE/tmp/                  uploads being checked (removed when rejected)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from emguard.data.chat import check_chat_jsonl
from emguard.service.rft import check_prompt_file, is_prompt_file

_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
CHUNK = 1 << 20


class UploadTooLarge(Exception):
    pass


class StateDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("files", "jobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def blob(self, file_id: str) -> Path:
        if not _FILE_ID.match(file_id):  # ids come from the database, but a path is built from them
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / "files" / file_id

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):  # ids come from the database, but a path is built from them
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "jobs" / job_id

    def run_dir(self, job_id: str) -> Path:
        """The job's emguard run directory (``emguard train`` and ``emguard eval`` write there)."""
        return self.job_dir(job_id) / "run"

    @contextlib.contextmanager
    def receive(self, source: BinaryIO, max_bytes: int) -> Iterator[tuple[Path, str, int]]:
        """Stream ``source`` to a temporary file (at most ``max_bytes``), yield (path, sha256, size);
        the temporary file is removed afterwards unless ``keep`` moved it."""
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".jsonl", dir=self.root / "tmp")
        path = Path(tmp)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(f"the file is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            yield path, digest.hexdigest(), size
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def keep(self, tmp: Path, file_id: str) -> None:
        """Move a checked upload to its place (one file per upload: deleting one never touches another)."""
        os.replace(tmp, self.blob(file_id))

    def remove_blob(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob(file_id).unlink()


def check_training_file(
    path: Path, display_name: str, max_examples: int, max_problems: int = 20
) -> tuple[int, list[str]]:
    """``emguard data check`` on an upload: (valid examples, problems naming the customer's file name).
    A file whose first record ends with a user turn is checked as reinforcement prompts."""
    if is_prompt_file(path):
        count, problems = check_prompt_file(path, display_name)
    else:
        examples, problems = check_chat_jsonl(path)
        count, problems = len(examples), [p.replace(str(path), display_name, 1) for p in problems]
    if len(problems) > max_problems:
        problems = [*problems[:max_problems], f"... and {len(problems) - max_problems} more problems"]
    if not problems and not count:
        problems = [f"{display_name}: no training examples (one JSON object with 'messages' per line)"]
    if count > max_examples:
        problems.append(f"{display_name}: {count} examples, over this service's limit of {max_examples}")
    return count, problems
