"""Helpers for tests/test_network.py: p2pvc nodes as separate processes on 127.0.0.1.

`nodes` starts and stops `p2pvc serve` and runs other commands per node,
`library` reads a repository and builds damaged or forged content through the library,
and `peer_client.py` is a minimal peer run as its own process.
"""
