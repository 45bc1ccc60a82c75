"""Outbound HTTP that reaches only what it was allowed to reach.

One guard for everything in sqapi that requests a URL somebody else chose: the ``http`` data
store (``data_store.allowed_hosts``) and the ``webhook`` plugin (``custom.webhook.allow_hosts``).
A URL passes three checks, and the request then goes exactly where they looked:

1. **Parsed once, the way the sender reads it.**  urllib3's ``parse_url`` (what requests sends
   with) takes the URL apart, and the request is rebuilt from those parts.  A host part with user
   info (``name:password@``), a backslash, a ``%``, white space or a control character is refused
   outright: parsers disagree about where such a host ends (``http://a:1\\@b:2/`` is host ``b``
   port 2 to :mod:`urllib.parse` but host ``a`` port 1 to urllib3).
2. **An allowed host and port.**  Each allow-list entry is ``host`` (the scheme's default port
   only: 80 for http, 443 for https), ``host:port`` (that port) or ``host:*`` (every port).  The
   host is a name, an IPv4 address, an IPv6 address in brackets (``[::1]:8080``) or a pattern with
   ``*`` and ``?`` (``*.example.com``; ``*`` is every host, ``*:*`` every host on every port).
3. **An allowed address.**  The host is resolved once and every address it resolves to must be
   globally reachable: loopback, private (RFC 1918, fc00::/7), shared (100.64.0.0/10), link-local,
   multicast, unspecified, reserved and NAT64 addresses, and IPv4-mapped or 6to4 forms of them,
   are refused -- unless the policy allows them (``private="allow"``) or, with the default
   ``private="named"``, an entry names that very host, without a wildcard, with its port number
   (``127.0.0.1:8080``, ``files.internal:9000``; ``host:*`` does not count).

The request connects to an address that was checked (the first that accepts the connection) and
to no other: there is no second lookup, so a name that changes its answer in between (DNS
rebinding) gains nothing.  The URL's host goes in the ``Host`` header and TLS verifies the
certificate for that host name.  Proxies from the environment are not used (a proxy would resolve
the name itself).  :meth:`HostGuard.request` follows redirects itself, at most ``max_redirects``,
checking each target the same way; the caller's headers go to the first URL's origin only, and a
redirect from https to http is refused.

Refusals raise :class:`~sqapi.errors.AccessDenied` (permanent: not retried) with a reason that
shows the URL without user info or query; a name that does not resolve raises
:class:`~sqapi.errors.ConnectorError` (retried).  Errors of the request itself are requests'
own (``requests.Timeout``, ``requests.ConnectionError``, ...): the caller translates them.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, LocationParseError
from urllib3.util import parse_url

from sqapi.config import url_for_logs
from sqapi.errors import AccessDenied, ConfigError, ConnectorError

#: "refuse": no address that is not globally reachable; "named": only for a host an entry names
#: literally with its port number; "allow": any address (the allow-list of hosts still applies)
PrivatePolicy = Literal["refuse", "named", "allow"]

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# the host part as written: a bracketed IPv6 address or a run of characters no parser reads as a
# delimiter or decodes (no user info, backslash, percent, white space or control character)
_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\x00-\x20\x7f\s\\/@%:\[\]?#]+)(?::(?P<port>[0-9]*))?")

#: IPv6 prefixes that lead to IPv4 space (NAT64, RFC 6052 / 8215)
_TRANSLATED = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def globally_reachable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a public unicast address (not private, shared 100.64/10, loopback, NAT64, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in _TRANSLATED):
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return globally_reachable(embedded)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _same_host(a: str, b: str) -> bool:
    ip_a, ip_b = _ip(a), _ip(b)
    if ip_a is not None or ip_b is not None:
        return ip_a == ip_b
    return a == b


def shown_url(url: str) -> str:
    """``url`` fit for an error message: without user info, query or fragment."""
    try:
        return url_for_logs(url)
    except ValueError:
        return "<malformed URL>"


@dataclass(frozen=True)
class Target:
    """A URL taken apart once, as urllib3 reads it; the request is rebuilt from these parts alone."""

    scheme: str        # "http" or "https"
    host: str          # lower case, IDNA-encoded; an IPv6 address without brackets
    port: int          # explicit, or the scheme's default
    request_uri: str   # path and query, as sent

    @property
    def netloc(self) -> str:
        """``host[:port]`` as the ``Host`` header carries it (the port only when not the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.request_uri}"

    @property
    def shown(self) -> str:
        """The URL without its query: fit for logs and error messages."""
        return f"{self.scheme}://{self.netloc}{self.request_uri.partition('?')[0]}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def parse_target(url: str, subject: str = "URL") -> Target:
    """``url`` taken apart as urllib3 reads it; :class:`AccessDenied` for anything ambiguous or not http(s)."""

    def refuse(reason: str) -> AccessDenied:
        return AccessDenied(f"{subject} {shown_url(url)!r} refused: {reason}")

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise refuse("only http and https URLs with a host")
    # the widest reading of the host part: up to the first '/', '?' or '#' (urllib.parse's);
    # urllib3 also stops at a backslash, which is why a backslash in it is refused
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "\\" in authority:
        raise refuse("a backslash in the host part (parsers disagree about where such a host ends)")
    if "@" in authority:
        raise refuse("user info (name:password@) is not allowed in the URL")
    written = _AUTHORITY.fullmatch(authority)
    if not written or not written["host"]:
        raise refuse("a malformed host part (only a name or address and a port)")
    port = int(written["port"]) if written["port"] else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise refuse("bad port")
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError):
        raise refuse("a malformed URL") from None
    host = (parsed.host or "").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    written_host = written["host"].lower().strip("[]")
    # the two readings must agree; a non-ASCII name is compared after urllib3's IDNA encoding only
    if not host or (parsed.port or DEFAULT_PORTS[scheme]) != port or (
            written_host.isascii() and not _same_host(host, written_host)):
        raise refuse("the host part reads differently to different parsers")
    return Target(scheme=scheme, host=host, port=port, request_uri=parsed.request_uri or "/")


@dataclass(frozen=True)
class HostRule:
    """One allow-list entry: ``host``, ``host:port`` or ``host:*`` (``host`` may be a ``*``/``?`` pattern)."""

    host: str
    port: int | None        # None: the scheme's default port
    any_port: bool = False

    @classmethod
    def parse(cls, entry: Any) -> HostRule:
        """The rule an entry states; :class:`ValueError` saying what is wrong with it."""
        text = str(entry).strip().lower()
        if not text or any(c in text for c in "/@\\%") or any(c.isspace() for c in text):
            raise ValueError("is not a host, host:port or host:* (no scheme, path or user info)")
        port_text: str | None
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or _ip(host) is None or (rest and not rest.startswith(":")):
                raise ValueError("is not a bracketed IPv6 address, e.g. [::1]:8080")
            port_text = rest[1:] if rest else None
        elif text.count(":") > 1:  # an IPv6 address without brackets: no port can follow it
            if _ip(text) is None:
                raise ValueError("is not an IPv6 address (write [address]:port to give a port)")
            host, port_text = text, None
        else:
            host, colon, port = text.partition(":")
            port_text = port if colon else None
            if not host:
                raise ValueError("has no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError("is not a valid international host name") from None
        if port_text is None:
            return cls(host, None)
        if port_text == "*":
            return cls(host, None, any_port=True)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("has a port that is not 1-65535 or *")
        return cls(host, int(port_text))

    @property
    def wildcard(self) -> bool:
        return any(c in self.host for c in "*?")

    def matches_host(self, host: str) -> bool:
        if self.wildcard:
            return fnmatch.fnmatchcase(host, self.host)
        return _same_host(host, self.host)

    def allows(self, target: Target) -> bool:
        if not self.matches_host(target.host):
            return False
        return self.any_port or target.port == (self.port or DEFAULT_PORTS[target.scheme])

    def names(self, target: Target) -> bool:
        """Whether this entry names ``target``'s host literally with its port number (it may then be private)."""
        return not self.wildcard and self.port == target.port and _same_host(target.host, self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:*" if self.any_port else f"{host}:{self.port}" if self.port else host


class Answer(NamedTuple):
    """The final response of :meth:`HostGuard.request` and the checked URL that gave it."""

    response: requests.Response
    target: Target


class HostGuard:
    """Checks URLs against an allow-list and sends requests only to the addresses it checked.

    ``setting`` names the allow-list in messages (``data_store.allowed_hosts``); ``subject``
    names what a URL is (``URL``, ``webhook URL``); ``private_hint`` says how to allow a
    refused address.  An entry that is not ``host``, ``host:port`` or ``host:*`` is a
    :class:`~sqapi.errors.ConfigError` naming ``setting``.
    """

    def __init__(self, allowed: Iterable[Any], *, setting: str, private: PrivatePolicy = "named",
                 subject: str = "URL", private_hint: str | None = None, source: str | None = None) -> None:
        self.setting = setting
        self.private = private
        self.subject = subject
        self.private_hint = private_hint or f"name it with its port in {setting} to allow it, e.g. 'host:8080'"
        self.rules: list[HostRule] = []
        for entry in allowed:
            try:
                self.rules.append(HostRule.parse(entry))
            except ValueError as exc:
                raise ConfigError(setting, f"entry {str(entry)!r} {exc}",
                                  "write host (default port only), host:port or host:*", source) from None

    def check(self, url: str, subject: str | None = None) -> Target:
        """``url`` parsed once, its scheme, host and port allowed; :class:`AccessDenied` otherwise (no DNS)."""
        subject = subject or self.subject
        target = parse_target(url, subject)
        if not any(rule.allows(target) for rule in self.rules):
            shown = f"{subject} {target.shown!r} refused"
            if not any(rule.matches_host(target.host) for rule in self.rules):
                raise AccessDenied(f"{shown}: host {target.host} is not in {self.setting}")
            raise AccessDenied(f"{shown}: port {target.port} of host {target.host} is not in {self.setting} (an "
                               "entry without a port allows only the scheme's default port; write host:port)")
        return target

    def resolve(self, target: Target, subject: str | None = None) -> list[str]:
        """Every address ``target``'s host resolves to (one lookup), each checked; in the resolver's order."""
        subject = subject or self.subject
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConnectorError(f"{subject} {target.shown!r}: host {target.host} does not resolve ({reason})") \
                from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise ConnectorError(f"{subject} {target.shown!r}: host {target.host} has no address")
        named = self.private == "named" and any(rule.names(target) for rule in self.rules)
        if self.private != "allow" and not named:
            for address in addresses:
                ip = ipaddress.ip_address(address.split("%")[0])
                if not globally_reachable(ip):
                    raise AccessDenied(f"{subject} {target.shown!r} refused: {target.host} resolves to {ip}, a "
                                       "private, loopback, link-local or otherwise not globally reachable address "
                                       f"({self.private_hint})")
        return addresses

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                data: bytes | None = None, timeout: float, verify: bool | str = True, stream: bool = False,
                max_redirects: int = 0) -> Answer:
        """Send ``method`` to ``url`` through every check, following up to ``max_redirects`` redirects.

        With ``max_redirects=0`` a 3xx answer is returned as it is.  More redirects than allowed,
        or one without a ``Location``, is :class:`AccessDenied`.  The caller closes the response.
        """
        target = self.check(url)
        origin = target.origin
        extra = dict(headers or {})
        followed = 0
        while True:
            response = _send_to_first_reachable(method, target, self.resolve(target), headers=extra, data=data,
                                                timeout=timeout, verify=verify, stream=stream)
            status = response.status_code
            if max_redirects <= 0 or status not in REDIRECT_STATUSES:
                return Answer(response, target)
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise AccessDenied(f"{self.subject} {target.shown!r} answered {status} without a Location")
            if followed >= max_redirects:
                raise AccessDenied(f"{self.subject} {url_for_logs(url)!r} refused: more than {max_redirects} "
                                   "redirects")
            followed += 1
            following = self.check(urljoin(target.url, location.strip()),
                                   subject=f"redirect from {target.shown!r} to")
            if target.scheme == "https" and following.scheme == "http":
                raise AccessDenied(f"redirect from {target.shown!r} to {following.shown!r} refused: it leaves https")
            if status == 303 or (status in (301, 302) and method.upper() == "POST"):
                method, data = "GET", None  # as browsers and requests do
            if following.origin != origin:
                extra = {}  # the caller's headers (credentials, perhaps) stay with the origin they were meant for
            target = following


class _PinnedHostAdapter(HTTPAdapter):
    """Connects to the checked address while TLS still verifies the certificate of the host name."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._hostname
        kwargs["assert_hostname"] = self._hostname
        super().init_poolmanager(*args, **kwargs)


def _send_to_first_reachable(method: str, target: Target, addresses: list[str], **kwargs: Any) -> requests.Response:
    """:func:`_send` to each checked address in turn until one accepts the connection (as a client
    connecting to a name would: an unreachable IPv6 address falls back to IPv4), never to another."""
    for address in addresses[:-1]:
        try:
            return _send(method, target, address, **kwargs)
        except requests.ConnectionError as exc:
            cause = exc.args[0] if exc.args else None
            if not isinstance(getattr(cause, "reason", cause), ConnectTimeoutError):
                raise  # the connection was made: the request may have been received, so it is not sent again
    return _send(method, target, addresses[-1], **kwargs)


def _send(method: str, target: Target, address: str, *, headers: Mapping[str, str], data: bytes | None,
          timeout: float, verify: bool | str, stream: bool) -> requests.Response:
    """One request to ``address`` (checked) for ``target``: the URL is rebuilt from the checked parts."""
    ip = address.replace("%", "%25")  # an IPv6 zone id, percent-encoded as URLs write it
    netloc = f"[{ip}]:{target.port}" if ":" in address else f"{address}:{target.port}"
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: the checked address is the one used
        session.mount(f"{target.scheme}://", _PinnedHostAdapter(target.host))
        # a streamed body keeps its connection after the session closes; the caller closes the response
        return session.request(method, f"{target.scheme}://{netloc}{target.request_uri}",
                               headers={**headers, "Host": target.netloc}, data=data, timeout=timeout,
                               verify=verify, stream=stream, allow_redirects=False)
