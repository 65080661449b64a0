"""``python -m prolong.jobs.launch [torchrun options] -m MODULE ARGS``: torchrun that keeps the ranks' exit code.

torchrun exits 1 whenever a rank fails, whatever the rank said. The exit code carries meaning here:
:data:`prolong.jobs.base.REQUEUE_EXIT_CODE` means "checkpoint saved on a scheduler's signal, run me
again", and each :class:`prolong.errors.ProlongError` class has its own code. So when every failed
rank agrees on a code, this launcher exits with it; otherwise with 1, as torchrun does.
"""

from __future__ import annotations

import sys


def exit_code_of(failures) -> int:
    codes = {f.exitcode if f.exitcode >= 0 else 128 - f.exitcode for f in failures.values()}
    return codes.pop() if len(codes) == 1 and 0 not in codes else 1


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        return exit_code_of(e.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
