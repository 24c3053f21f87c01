"""``python -m trainer.launch <torchrun arguments>``: torchrun, minus its launcher traceback.

When a rank fails, torchrun raises ``ChildFailedError`` in the launcher and prints ~30 lines of Python
traceback under the rank's own output, exiting 1. Every refused setting (``mva-train: error: ...``,
exit status 2 from each rank) then looked like a crash. Here the launcher exits with the failed rank's
status (2 for such an error, 128+N for signal N, as a shell reports it; 128+N with one line too when the
launcher itself gets signal N, e.g. Slurm's SIGTERM) and prints torchrun's failure
summary (ranks, exit codes, signals) unless that status is 2 (the ranks' own line said it). Any other
launcher error keeps its traceback. Used by scripts/train.sh and scripts/slurm/node_torchrun.sh; a
drop-in for ``torchrun`` in the README's inference command.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def exit_status(exitcode: int) -> int:
    """A failed rank's status as the shell reports it: a signal N (torch gives -N) is 128+N."""
    return 128 - exitcode if exitcode < 0 else (exitcode or 1)


def check_entry_point(args: list[str]) -> None:
    """An unknown key or preset in ``-m trainer.train ...`` / ``-m trainer.infer ...`` (and for training, a bad
    config value or store): refused here, once, in one line (exit 2), not by every rank after they started."""
    if "-m" not in args or args.index("-m") + 1 >= len(args):
        return
    i = args.index("-m")
    if args[i + 1] == "trainer.train":
        from trainer.train import check_cli, preflight

        check_cli(args[i + 2:])
        preflight(args[i + 2:])
        return
    if args[i + 1] == "trainer.infer":
        from trainer.infer import check_cli
    else:
        return
    check_cli(args[i + 2:])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    check_entry_point(args)
    try:
        torchrun(args)
    except ChildFailedError as e:
        code = exit_status(e.get_first_failure()[1].exitcode)
        if code != 2:
            print(e, file=sys.stderr)
        sys.exit(code)
    except SignalException as e:
        # the launcher itself was signalled (Slurm's SIGTERM at a cancel or the time limit): torchrun has
        # stopped the ranks; a traceback and status 1 read as a crash of ours
        sig = int(e.sigval)
        print(f"[launch] stopped by signal {sig} ({e.sigval.name}); the ranks were stopped: rerun to resume "
              "from the newest complete checkpoint", file=sys.stderr)
        sys.exit(128 + sig)


if __name__ == "__main__":
    main()
