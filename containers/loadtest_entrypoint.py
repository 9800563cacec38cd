"""The load tester image's entrypoint: results owned by whoever owns the results folder.

Compose bind-mounts ./loadtest-results at /results. The tester must write there, and
what it writes must belong to the person who ran it, without anyone passing their uid.
The folder tells who that is: this starts as root only to read its owner, then

* runs the tester as that owner, with no groups and no capabilities, when it is not root
  (`mkdir -p loadtest-results` as yourself, or a checkout of yours);
* runs the tester as loadtester (10001) in a staging folder when root owns it (root ran
  the command, or the engine created the folder), then copies the results in as root,
  the folder's owner. Only that copy runs as root, never the tester.

Started as any other user (`docker compose run --user …`), it runs the tester as that user.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

TESTER = [sys.executable, "-m", "load_tester"]
# The image's own user (load_tester/Dockerfile).
TESTER_UID = TESTER_GID = 10001


def run_as_owner(uid: int, gid: int, args: list[str]) -> None:
    """Become the folder's owner for good, then become the tester."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.execv(TESTER[0], [*TESTER, *args])


def run_staged(results: Path, args: list[str]) -> int:
    """Run the tester as TESTER_UID into a staging folder, then copy its results into ``results``."""
    staging = Path(tempfile.mkdtemp(prefix="results-"))
    os.chown(staging, TESTER_UID, TESTER_GID)
    tester = subprocess.Popen(
        [*TESTER, *args],
        env={**os.environ, "LOADTEST_OUTPUT_DIR": str(staging)},
        user=TESTER_UID,
        group=TESTER_GID,
        extra_groups=[],
    )
    # Ctrl-C reaches the tester from the terminal itself; it writes its partial results and ends,
    # and they are still copied. A stop (SIGTERM) is passed on to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: tester.send_signal(signum))
    status = tester.wait()
    # Entry by entry: the results folder itself keeps its owner and mode.
    for entry in staging.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, results / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, results / entry.name)
    print(f"Results copied into {results}: root owns it, so the tester (uid {TESTER_UID}) wrote them to {staging}.")
    # A tester ended by a signal exits as a shell would report it: 128 + the signal's number.
    return status if status >= 0 else 128 - status


def main(args: list[str]) -> int:
    results = Path(os.environ.get("LOADTEST_OUTPUT_DIR", "/results"))
    if os.getuid() != 0:
        os.execv(TESTER[0], [*TESTER, *args])
    try:
        owner = results.stat()
    except OSError as exc:
        print(f"cannot read the results folder {results}: {exc.strerror}. Mount one there "
              "(compose mounts ./loadtest-results).", file=sys.stderr)
        return 2
    if owner.st_uid != 0:
        run_as_owner(owner.st_uid, owner.st_gid, args)
    return run_staged(results, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
