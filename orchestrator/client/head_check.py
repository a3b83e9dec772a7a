"""`python -m orchestrator.client.head_check HOST:PORT`: exits 0 once the Ray head there and its
controller answer, else 1 with one line on stderr. `trainctl cluster up` runs it (in a process of
its own, so that a head that hangs can be given up on) before it records the head it started."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    (address,) = argv
    try:
        from .api import Client

        Client(address)  # ray.init, then the controller (created if need be) answers a ping
    except Exception as exc:  # noqa: BLE001 (any failure means: this head does not answer)
        line = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{type(exc).__name__}: {line}"[:300], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
