"""Networking: a hardened py-libp2p host (`p2pvc.net.host`) and stream framing (`p2pvc.net.framing`).

This package file imports nothing, so importing `p2pvc.net.framing` does not load
libp2p (about 0.7 s). Import `p2pvc.net.host` only in code that opens the network.
"""
