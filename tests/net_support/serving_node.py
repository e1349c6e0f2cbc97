"""A node that serves until SIGINT or SIGTERM, for tests/test_net_host.py.

Usage: python serving_node.py

Starts a host on 127.0.0.1 with a free port, prints "listening ADDRESS" and
waits. SIGINT and SIGTERM cancel the `open_host` block, as `p2pvc serve`
does, so both go through the host's normal stop. A KeyboardInterrupt that
Python raised inside py-libp2p's listener instead would end trio.run with
TrioInternalError (see the NOTE of `open_host`). Then it prints "stopped"
and exits. It also stops on its own after 60 s, so a
test that fails to signal it leaves no process behind for long.
"""

from __future__ import annotations

import os
import signal

import trio

from p2pvc.net.host import open_host

MAX_LIFETIME = 60.0


async def cancel_on_signal(scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()  # the handlers are in place before "listening" is printed
        async for _ in signals:
            scope.cancel()
            return


async def main() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(cancel_on_signal, nursery.cancel_scope)
        async with open_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) as host:
            print("listening", host.listen_addrs[0], flush=True)
            await trio.sleep(MAX_LIFETIME)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
    print("stopped", flush=True)
