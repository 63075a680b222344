"""The --output folder of a run: one run at a time in it, what a new or resumed run may find there, the
invalid-records report and the metrics log.

    DIR/config.json, model.safetensors, tokenizer files, README.md   the fine-tuned model (LoRA merged)
    DIR/metrics.jsonl                                                one line per optimizer step
    DIR/checkpoints/                                                 see `checkpoints`
    DIR/invalid_records.txt                                          when the data has invalid records
    DIR/.lock                                                        while a run is using the folder
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vqa2cli.errors import SetupError
from vqa2cli.files import FolderLock, is_leftover, remove_leftovers, write_text
from vqa2cli.finetune.checkpoints import CHECKPOINTS, checkpoint_dirs

METRICS = "metrics.jsonl"
INVALID_REPORT = "invalid_records.txt"
LOCK = ".lock"


class OutputFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = FolderLock(self.path, LOCK, label=f"--output {self.path}", holder="another vqa2 finetune")
        self.created = False

    def claim(self, resume: bool) -> str | None:
        """Lock the folder for this run (made if need be) and check it may be used: new or empty, or with
        `resume` holding a run's checkpoints; nothing of the user's is ever overwritten. Returns a note when
        the lock was left by a run that was killed."""
        if self.path.exists() and not self.path.is_dir():
            raise SetupError(f"--output {self.path} is a file")
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        left = self.lock.acquire()
        try:
            self._check_contents(resume)
        except BaseException:
            self.release()
            raise
        remove_leftovers(self.path)
        if (self.path / CHECKPOINTS).is_dir():
            remove_leftovers(self.path / CHECKPOINTS)
        if left:
            return (f"note: taking over {self.path} from the run that left its lock (pid {left.get('pid')} on "
                    f"{left.get('host')}, started {left.get('started')}), which is no longer running")
        return None

    def _check_contents(self, resume: bool) -> None:
        if checkpoint_dirs(self.path):
            if not resume:
                raise SetupError(f"{self.path} holds checkpoints of an earlier run: pass --resume to continue it, "
                                 "or choose another --output")
            return
        # what a run leaves before its first checkpoint (or a stop at validation) starts afresh
        ours = {METRICS, INVALID_REPORT, CHECKPOINTS, LOCK}
        others = [p for p in self.path.iterdir() if p.name not in ours and not is_leftover(p.name)]
        if others:
            raise SetupError(f"--output {self.path} is not empty; choose a new or empty folder")

    def release(self) -> None:
        self.lock.release()
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()  # a run that stopped before writing anything leaves no trace

    def report_invalid(self, problems: list) -> Path:
        """Write the full list of invalid records (or remove an earlier run's list when there are none)."""
        report = self.path / INVALID_REPORT
        if problems:
            write_text(report, "".join(f"{p}\n" for p in problems))
        else:
            report.unlink(missing_ok=True)
        return report

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def trim_metrics(self, step: int) -> None:
        """Drop log lines past the step a run starts from (written after its last checkpoint)."""
        path = self.path / METRICS
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) != len(lines):
            write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short by a crash (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
