"""A full disk, said the same way by both stages.

Precompute and training write so that a full disk loses nothing finished (samples are sealed, and
checkpoints renamed, only once complete), so the fix is always the same: free space and rerun the
same command. Both stages catch the OSError at their top level, ask `disk_full_message` and stop
with one line instead of a traceback (docs/reliability.md). Over quota (EDQUOT) is the same case.
"""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(err: OSError, kept: str, resumes: str) -> str | None:
    """The one-line message for `err` when it is a full disk (or quota), None for any other error.

    `kept` says what is safe on disk, `resumes` where the rerun starts, e.g.
    "the disk is full ([Errno 28] ...). {kept}: free some space and rerun the same command, it
    resumes {resumes}"."""
    if err.errno not in DISK_FULL_ERRNOS:
        return None
    return (
        f"the disk is full ({err}). {kept}: free some space and rerun the same command, it "
        f"resumes {resumes}"
    )
