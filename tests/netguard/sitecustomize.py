"""Loaded by every Python process the network tests start (PYTHONPATH): refuses, and records
in $KRONJAX_NETGUARD_LOG, any socket connection or name lookup that is not loopback, so a test
fails if anything tries to leave the machine (credential discovery, a metadata server...)."""

import os
import socket

_LOG = os.environ.get("KRONJAX_NETGUARD_LOG", "")
_LOOPBACK = ("127.", "::1", "::ffff:127.", "localhost")


def _blocked(what: str) -> OSError:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    return OSError(f"netguard: {what} refused (tests may only reach loopback)")


def _check(address) -> None:
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        host = address[0]
        if not host.startswith(_LOOPBACK):
            raise _blocked(f"connect to {address!r}")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if host is not None and not str(host).startswith(_LOOPBACK):
        raise socket.gaierror(socket.EAI_NONAME, str(_blocked(f"lookup of {host!r}")))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = getaddrinfo
