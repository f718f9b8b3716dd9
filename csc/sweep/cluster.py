"""Joining a Ray cluster that someone started (`--address HOST:PORT`): one question to its GCS, with this driver's
token, before the sweep starts anything, so that a refused token or an address where no cluster answers is one line
that says what to set, not `ray.init`'s twenty seconds of retries, a warning per retry, and "Failed to connect".

Ray's token authentication (Ray 2.60): every process of the cluster, the driver included, needs RAY_AUTH_MODE=token and
the same token, in RAY_AUTH_TOKEN or in the file ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH); `ray get-auth-token
--generate` makes one there and prints it. Ray has no public call that asks the GCS once, so this uses its GcsClient,
and stays silent when that is not there (the join then fails or succeeds in ray.init as before).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from csc.errors import CscError

_HOST_PORT = re.compile(r"[^:/\s]+:\d+")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Ray's C++ client warns on file descriptor 2 for each failed attempt; the error raised below says it all."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_cluster(address: str) -> None:
    """Raise a CscError naming what to set when the cluster at HOST:PORT refuses this driver's token, or when
    nothing answers there. Other addresses ("auto", ray://) are left to ray.init."""
    if not _HOST_PORT.fullmatch(address):
        return
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:
        return
    try:
        with _quiet_stderr():
            GcsClient(address=address)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        sent = ("this driver sent none: RAY_AUTH_MODE is not 'token' here" if mode.lower() != "token" else
                "the token this driver sent (RAY_AUTH_TOKEN, else ~/.ray/auth_token) is not the cluster's")
        raise CscError(f"--address {address}: the Ray cluster refused this driver's authentication token ({sent}); "
                       f"export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token every node was started with> "
                       f"(`ray get-auth-token` on the head node prints it)") from None
    except RpcError as e:
        raise CscError(f"--address {address}: no Ray cluster answers there ({str(e).strip()}); start one with "
                       f"`ray start --head --port=PORT` on that machine, or give the address `ray start` printed") \
            from None
