"""The parent of a script job's command on its rank: nothing of the script outlives the rank.

Run by path with the worker's interpreter (stdlib only, imports nothing of trainctl):

    python script_guard.py ACTOR_PID ARGV...

It leads a new process group (Popen(start_new_session=True)) and starts ARGV in it. Three
ways the rank can go, and what makes sure the whole group (the script and whatever it started:
DataLoader workers, helper processes) goes with it:
  - the actor dies (`ray.kill` is a SIGKILL no handler of the actor sees): the kernel sends the
    guard SIGHUP (prctl PR_SET_PDEATHSIG) and the guard SIGKILLs the group;
  - the guard itself is SIGKILLed: Ray's raylet kills a dead worker's direct children, and
    the guard is one. So the guard forks a *keeper* first, a child of its own that gets SIGHUP
    when the guard dies, whatever the cause, and then SIGKILLs the group; the script, too,
    is told to die with the guard (PR_SET_PDEATHSIG: SIGKILL);
  - the script exits: the guard exits as it did (the same code, or killed by the same
    signal), its keeper then clears whatever the script left running.
A SIGTERM (preemption, sent to the group) reaches the script; guard and keeper ignore it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _kill_group(signum=None, frame=None) -> None:
    os.killpg(0, signal.SIGKILL)  # this process too: the rank is gone, nobody waits for us


def _die_with_parent(sig: int) -> None:
    """Ask the kernel for `sig` when this process's parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the actor's own cleanup is all there is
        pass


def _fork_keeper() -> None:
    """A child that SIGKILLs the group once the guard is gone (see the module doc)."""
    guard = os.getpid()
    if os.fork() != 0:
        return
    try:
        _die_with_parent(signal.SIGHUP)  # the SIGHUP handler (_kill_group) is inherited
        if os.getppid() != guard:  # the guard died before the prctl took effect
            _kill_group()
        while True:
            signal.pause()
    finally:
        os._exit(0)


def main(argv: list[str]) -> int:
    actor_pid, command = int(argv[0]), argv[1:]
    signal.signal(signal.SIGHUP, _kill_group)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler, not SIG_IGN: the script gets the default
    _die_with_parent(signal.SIGHUP)
    if os.getppid() != actor_pid:  # the actor died before the prctl took effect
        return 137
    _fork_keeper()
    try:
        # the guard has one thread: preexec_fn is safe here (it is not in the actor)
        child = subprocess.Popen(command, preexec_fn=lambda: _die_with_parent(signal.SIGKILL))
    except OSError as exc:
        print(f"[trainctl] cannot start {command[0]!r}: {exc.strerror}; check the command's first word",
              file=sys.stderr, flush=True)
        return 127
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    if code < 0:  # died by a signal: so do we, so the actor sees the same death
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            pass
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
