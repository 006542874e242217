"""One guest connection to the metadata service: QEMU's guestfwd runs this file per
connection, with the connection as stdin and stdout, and it relays it to the service.

It runs as ``python -I -S imds_relay.py PORT SLOTS``: isolated (no working directory or
environment on its path: a checkout's ``builder/`` must not run here) and with the standard
library only, and it takes one of MAX_RELAYS slot locks before anything else, or leaves at
once, so that a guest opening connections without end costs little.
"""

import contextlib
import fcntl
import os
import socket
import sys
import threading

MAX_RELAYS = 16


def take_slot(slots: str) -> object | None:
    """The held lock file of a free slot, or None."""
    for slot in range(MAX_RELAYS):
        handle = open(os.path.join(slots, str(slot)), "a")  # noqa: SIM115 (held to the end)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            handle.close()
    return None


def relay(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        def upstream() -> None:
            while data := os.read(0, 65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        threading.Thread(target=upstream, daemon=True).start()
        while data := sock.recv(65536):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]


if __name__ == "__main__":
    held = take_slot(sys.argv[2])  # (kept: the lock lasts as long as the file is open)
    if held is not None:  # else: too many at once, the guest sees the connection close
        with contextlib.suppress(OSError):  # the service is gone (the machine is stopping)
            relay(int(sys.argv[1]))
