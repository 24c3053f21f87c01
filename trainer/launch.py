"""``python -m trainer.launch <torchrun arguments>``: torchrun, minus its launcher traceback.

When a rank fails, torchrun raises ``ChildFailedError`` in the launcher and prints ~30 lines of Python
traceback under the rank's own output, exiting 1. Every refused setting (``mva-train: error: ...``,
exit status 2 from each rank) then looked like a crash. Here the launcher exits with the failed rank's
status (2 for such an error, 128+N for signal N, as a shell reports it) and prints torchrun's failure
summary (ranks, exit codes, signals) unless that status is 2 (the ranks' own line said it). Any other
launcher error keeps its traceback. Used by scripts/train.sh and scripts/slurm/node_torchrun.sh; a
drop-in for ``torchrun`` in the README's inference command.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def exit_status(exitcode: int) -> int:
    """A failed rank's status as the shell reports it: a signal N (torch gives -N) is 128+N."""
    return 128 - exitcode if exitcode < 0 else (exitcode or 1)


def main(argv: list[str] | None = None) -> None:
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        code = exit_status(e.get_first_failure()[1].exitcode)
        if code != 2:
            print(e, file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
