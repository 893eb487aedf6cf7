"""Who sent a correction: a signed-in user, an API token's name, or an anonymous network.

Believed in this order (docs/feedback.md, "Who is a submitter"):
- a user that a reverse proxy in front signed in, in the one header `--user-header` names (oauth2-proxy's
  `X-Forwarded-User` or `X-Auth-Request-User`), only when the peer is a `--trust-proxy` address (any client
  can write the header: the proxy must set or clear it on every request); twice in a request is refused;
- with `--tokens FILE`, an API client's `Authorization: Bearer` token, as its name; without a valid one the
  request is refused (401) before its body is read;
- else an anonymous client: its IPv4 address, or its IPv6 /64 (one host's privacy addresses, or a whole
  subnet, are one submitter), the address being `X-Forwarded-For`'s last untrusted entry when the peer is a
  trusted proxy.
The store turns each into a pseudonym (`Store.submitter`) that keys its rate bucket and its caps in curate.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mnist_pipeline.errors import PipelineError

USER_HEADERS = ("X-Forwarded-User", "X-Auth-Request-User")  # oauth2-proxy's, with --set-xauthrequest for the second
MAX_NAME = 256  # characters of a user's or a token's name
TOKEN_LINE = re.compile(r"^(?P<name>[^\s#]\S{0,255})\s+sha256:(?P<hash>[0-9a-f]{64})$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokensError(PipelineError):
    """A tokens file that cannot be used: the line and why."""


@dataclass(frozen=True)
class Identity:
    kind: str  # "user" (signed in by the proxy), "token" (an API client) or "client" (an anonymous network)
    name: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """`NAME sha256:HEX` lines (`mnist-feedback token NAME --file FILE` writes them): hash → name. The file holds
    hashes only, so reading it reveals no token."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensError(f"--tokens {path}: cannot read it ({exc})") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        found = TOKEN_LINE.match(line.strip())
        if not found:
            raise TokensError(f"--tokens {path}, line {number}: expected `NAME sha256:<64 hex digits>`")
        if found["hash"] in tokens:
            raise TokensError(f"--tokens {path}, line {number}: that token is already {tokens[found['hash']]!r}'s")
        tokens[found["hash"]] = found["name"]
    return tokens


def networks(addresses: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(a, strict=False) for a in addresses]


def anonymous(host: str) -> str:
    """An anonymous client's key: its IPv4 address, or the /64 of its IPv6 one (an IPv4-mapped address is its
    IPv4 address); anything else as it is."""
    address = _address(host)
    if address is None:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, an IPv4-mapped IPv6 one (a dual-stack socket's IPv4 peer) as its IPv4 address; None if not one."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(host: str, trusted: Sequence[Network]) -> bool:
    address = _address(host)
    return address is not None and any(address in network for network in trusted)


def forwarded_client(peer: str, forwarded_for: str, trusted: Sequence[Network]) -> str:
    """The client behind trusted proxies: `X-Forwarded-For` read from the right, the first entry that is not a
    trusted proxy (the ones left of it were written by whoever connected to that proxy, and are believed by no
    one); the peer when the header names nothing usable."""
    for entry in reversed([e.strip() for e in forwarded_for.split(",") if e.strip()]):
        if not _trusted(entry, trusted):
            return entry if _address(entry) is not None else peer
    return peer


class Headers(Protocol):
    def getlist(self, key: str) -> list[str]: ...


class Identities:
    """Decides a request's submitter from its peer address and headers (Starlette's, every copy of one readable)."""

    def __init__(
        self, trust_proxy: Sequence[str] = (), tokens: Mapping[str, str] | None = None, user_header: str | None = None
    ) -> None:
        self.trusted = networks(trust_proxy)
        self.tokens = tokens
        self.user_header = user_header

    def of(self, peer: str, headers: Headers) -> Identity | str:
        """The submitter, or why the request is refused (a 401's message)."""
        from_proxy = _trusted(peer, self.trusted)
        if from_proxy and self.user_header:
            users = [u.strip() for u in headers.getlist(self.user_header)]
            if len(users) > 1:
                return f"{self.user_header} more than once"
            if users and users[0]:
                if len(users[0]) > MAX_NAME or not users[0].isprintable():
                    return f"{self.user_header}: not a user name"
                return Identity("user", users[0])
        if self.tokens is not None:
            given = headers.getlist("authorization")
            scheme, _, token = (given[0] if len(given) == 1 else "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return "sign in, or send `Authorization: Bearer <token>`"
            name = self.tokens.get(token_hash(token.strip()))
            return Identity("token", name) if name is not None else "that token is not valid here"
        # Proxies that add a line rather than extend one: every copy, in order, the last entries the nearest.
        forwarded = ", ".join(headers.getlist("x-forwarded-for"))
        client = forwarded_client(peer, forwarded, self.trusted) if from_proxy else peer
        return Identity("client", anonymous(client))
