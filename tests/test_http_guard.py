"""The outbound guard (sqapi.connectors.guard) through the http data store, against real servers on loopback.

Every refusal test keeps a *canary*: a server that must see no request at all.
"""

from __future__ import annotations

import http.server
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from sqapi.connectors import guard as guard_module
from sqapi.connectors.data import http as http_store
from sqapi.connectors.guard import HostGuard, Target, parse_target
from sqapi.errors import AccessDenied, ConfigError


@dataclass
class Seen:
    path: str
    host: str | None
    headers: dict[str, str]


@dataclass
class Site:
    """A real HTTP server: answers GET with its own name, or with a redirect set in ``redirects``."""

    address: str = "127.0.0.1"
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)

    def start(self) -> Site:
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                site.seen.append(Seen(self.path, self.headers.get("Host"),
                                      {k.lower(): v for k, v in self.headers.items()}))
                if self.path in site.redirects:
                    status, location = site.redirects[self.path]
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = f"from {site.address}:{site.port}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((self.address, self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def url(self, path: str = "/x") -> str:
        return f"http://{self.hostport}{path}"


@pytest.fixture
def sites() -> Iterator[Callable[..., Site]]:
    started: list[Site] = []

    def start(address: str = "127.0.0.1", port: int = 0) -> Site:
        site = Site(address, port).start()
        started.append(site)
        return site

    yield start
    for site in started:
        site.stop()


@pytest.fixture
def allowed(sites: Callable[..., Site]) -> Site:
    return sites()


@pytest.fixture
def canary(sites: Callable[..., Site]) -> Site:
    return sites()


def fetch(tmp_path: Path, url: str, allowed_hosts: list[str], **extra: Any) -> bytes:
    path = http_store.download_to_disk({"allowed_hosts": allowed_hosts, "temp_dir": str(tmp_path), **extra}, url)
    return Path(path).read_bytes()


def refusal(tmp_path: Path, url: str, allowed_hosts: list[str], **extra: Any) -> str:
    """The reason the fetch of ``url`` was refused ('' when it was not): callers look at their canary first."""
    try:
        fetch(tmp_path, url, allowed_hosts, **extra)
    except AccessDenied as exc:
        return str(exc)
    return ""


def resolving(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[str]]) -> dict[str, int]:
    """Make each name of ``names`` resolve, as a hosts file would, to its answers in turn (the last one
    from then on; an answer may list several addresses: ``"127.0.0.2,127.0.0.1"``); every other name
    and address resolves as usual.  Returns the lookups per name."""
    real = socket.getaddrinfo
    lookups = dict.fromkeys(names, 0)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            answers = names[host]
            answer = answers[min(lookups[host], len(answers) - 1)]
            lookups[host] += 1
            return [info for address in answer.split(",") for info in real(address, port, *args, **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


# -- one parse: the host and port checked are the ones connected to --------------------------------

@pytest.mark.parametrize("form", ["{canary}\\@{allowed}", "{canary}@{allowed}", "{canary}\\\\@{allowed}",
                                  "user:pw@{allowed}", "{canary}%40{allowed}", "{canary}\t@{allowed}"])
def test_a_url_whose_host_part_parsers_read_differently_reaches_no_server(
        tmp_path: Path, allowed: Site, canary: Site, form: str) -> None:
    url = "http://" + form.format(canary=canary.hostport, allowed=allowed.hostport) + "/x"
    reason = refusal(tmp_path, url, [allowed.hostport])
    assert canary.seen == [] and allowed.seen == []
    assert re.search("refused: (user info|a backslash|a malformed host part)", reason)


def test_a_refused_url_shows_neither_its_credentials_nor_its_query(tmp_path: Path, allowed: Site) -> None:
    with pytest.raises(AccessDenied) as refused:
        fetch(tmp_path, f"http://admin:hunter2@{allowed.hostport}/x?token=t0ps3cret", [allowed.hostport])
    assert "hunter2" not in str(refused.value) and "t0ps3cret" not in str(refused.value)
    assert "user info" in str(refused.value) and allowed.seen == []


def test_the_url_sent_is_rebuilt_from_the_parts_that_were_checked(tmp_path: Path, allowed: Site) -> None:
    assert fetch(tmp_path, f"http://{allowed.hostport}/a/../x?q=1#frag", [allowed.hostport]) == \
        f"from {allowed.hostport}".encode()
    assert [(s.path, s.host) for s in allowed.seen] == [("/x?q=1", allowed.hostport)]


# -- host and port ----------------------------------------------------------------------------------

def test_an_allowed_host_without_a_port_allows_only_the_default_port(tmp_path: Path, canary: Site) -> None:
    reason = refusal(tmp_path, canary.url(), ["127.0.0.1"])
    assert canary.seen == []
    assert f"port {canary.port} of host 127.0.0.1 is not in data_store.allowed_hosts" in reason


def test_an_allowed_name_without_a_port_allows_only_the_default_port(
        tmp_path: Path, canary: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"files.example.test": ["127.0.0.1"]})
    with pytest.raises(AccessDenied, match="not in data_store.allowed_hosts"):
        fetch(tmp_path, f"http://files.example.test:{canary.port}/x", ["files.example.test"])
    assert canary.seen == []


def test_host_star_opens_every_port_of_a_host_named_with_it(tmp_path: Path, canary: Site,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = parse_target(f"http://files.example.test:{canary.port}/x")
    assert HostGuard(["files.example.test:*"], setting="s").check(target.url) == target
    assert HostGuard(["*.example.test:*"], setting="s").check(target.url) == target
    with pytest.raises(AccessDenied, match="host files.example.test is not in s"):
        HostGuard(["other.example.test:*"], setting="s").check(target.url)


# -- addresses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["*:*", "127.0.0.1:*", "*.0.0.1:{port}", "127.0.0.*:{port}"])
def test_loopback_is_refused_unless_an_entry_names_it_with_its_port(tmp_path: Path, canary: Site, entry: str) -> None:
    with pytest.raises(AccessDenied, match="resolves to 127.0.0.1, a private, loopback, link-local or otherwise not "
                                           r"globally reachable address \(name it with its port in "
                                           "data_store.allowed_hosts"):
        fetch(tmp_path, canary.url(), [entry.format(port=canary.port)])
    assert canary.seen == []


def test_loopback_named_with_its_port_is_fetched(tmp_path: Path, allowed: Site) -> None:
    assert fetch(tmp_path, allowed.url(), [allowed.hostport]) == f"from {allowed.hostport}".encode()


def test_a_name_resolving_to_a_private_address_is_refused_after_resolution(
        tmp_path: Path, canary: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"files.example.test": ["127.0.0.1"]})
    with pytest.raises(AccessDenied, match="files.example.test resolves to 127.0.0.1, a private, loopback"):
        fetch(tmp_path, f"http://files.example.test:{canary.port}/x", ["*.example.test:*"])
    assert canary.seen == []


def test_localhost_is_refused_after_resolution_unless_named_with_its_port(tmp_path: Path, canary: Site) -> None:
    with pytest.raises(AccessDenied, match="localhost resolves to"):
        fetch(tmp_path, f"http://localhost:{canary.port}/x", ["localhost:*"])
    assert canary.seen == []


def test_a_name_named_with_its_port_may_resolve_to_a_private_address_and_keeps_its_host_header(
        tmp_path: Path, allowed: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"files.example.test": ["127.0.0.1"]})
    url = f"http://files.example.test:{allowed.port}/x"
    assert fetch(tmp_path, url, [f"files.example.test:{allowed.port}"]) == f"from {allowed.hostport}".encode()
    assert [s.host for s in allowed.seen] == [f"files.example.test:{allowed.port}"]


def test_the_connection_goes_to_the_address_that_was_checked_without_a_second_lookup(
        tmp_path: Path, sites: Callable[..., Site], monkeypatch: pytest.MonkeyPatch) -> None:
    checked = sites("127.0.0.1")
    rebound = sites("127.0.0.2", checked.port)  # where a second lookup of the name would lead
    lookups = resolving(monkeypatch, {"rebind.example.test": ["127.0.0.1", "127.0.0.2"]})
    body = fetch(tmp_path, f"http://rebind.example.test:{checked.port}/x", [f"rebind.example.test:{checked.port}"])
    assert body == f"from {checked.hostport}".encode()
    assert lookups == {"rebind.example.test": 1} and rebound.seen == []


def test_a_name_with_several_checked_addresses_falls_back_to_the_next_when_one_refuses_connections(
        tmp_path: Path, allowed: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.3", allowed.port))  # bound but not listening: connections to it are refused
    try:
        resolving(monkeypatch, {"dual.example.test": ["127.0.0.3,127.0.0.1"]})
        url = f"http://dual.example.test:{allowed.port}/x"
        assert fetch(tmp_path, url, [f"dual.example.test:{allowed.port}"]) == f"from {allowed.hostport}".encode()
    finally:
        closed.close()


def test_one_address_that_is_not_globally_reachable_refuses_the_whole_name(
        tmp_path: Path, canary: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"mixed.example.test": ["8.8.8.8,127.0.0.1"]})
    with pytest.raises(AccessDenied, match="mixed.example.test resolves to 127.0.0.1"):
        fetch(tmp_path, f"http://mixed.example.test:{canary.port}/x", ["*.example.test:*"])
    assert canary.seen == []


@pytest.mark.parametrize("address", ["100.64.0.1", "100.127.255.254", "64:ff9b::a00:1", "64:ff9b::808:808",
                                     "64:ff9b:1::1", "2002:7f00:1::1", "2002:a00:1::1", "::ffff:100.64.0.1",
                                     "224.0.0.1", "240.0.0.1", "0.0.0.0", "::", "10.1.2.3", "172.16.0.1",
                                     "192.168.1.1", "169.254.169.254", "fe80::1", "fc00::1", "::1", "127.0.0.1"])
def test_addresses_that_are_not_globally_reachable_are_refused(address: str) -> None:
    with pytest.raises(AccessDenied, match=f"resolves to {ipaddress.ip_address(address)}, a private"):
        HostGuard(["*:*"], setting="s").resolve(Target("https", address, 443, "/"))


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888"])
def test_global_addresses_are_accepted(address: str) -> None:
    assert HostGuard(["*:*"], setting="s").resolve(Target("https", address, 443, "/")) == [address]


def test_a_policy_allowing_private_addresses_still_checks_hosts_and_ports(canary: Site) -> None:
    guard = HostGuard([canary.hostport], setting="s", private="allow")
    assert guard.resolve(guard.check(canary.url())) == ["127.0.0.1"]
    with pytest.raises(AccessDenied, match="not in s"):
        guard.check(f"http://127.0.0.1:{canary.port + 1}/x")


# -- redirects --------------------------------------------------------------------------------------

def test_a_redirect_to_another_allowed_server_is_followed(tmp_path: Path, allowed: Site,
                                                          sites: Callable[..., Site]) -> None:
    second = sites()
    allowed.redirects["/x"] = (302, second.url("/y"))
    assert fetch(tmp_path, allowed.url(), [allowed.hostport, second.hostport]) == f"from {second.hostport}".encode()
    assert [s.path for s in second.seen] == ["/y"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_port_is_checked_and_refused_before_any_request(
        tmp_path: Path, allowed: Site, canary: Site, status: int) -> None:
    allowed.redirects["/x"] = (status, canary.url("/y"))
    with pytest.raises(AccessDenied, match=f"redirect from '{allowed.url()}' to '{canary.url('/y')}' refused: "
                                           f"port {canary.port} of host 127.0.0.1 is not in data_store.allowed_hosts"):
        fetch(tmp_path, allowed.url(), [allowed.hostport])
    assert canary.seen == []


@pytest.mark.parametrize("location, entry", [("http://127.0.0.1:{port}/y", "*:*"),
                                             ("http://localhost:{port}/y", "localhost:*"),
                                             ("http://127.0.0.1:{port}/y", "127.0.0.1:*")])
def test_a_redirect_to_loopback_not_named_with_its_port_is_refused(
        tmp_path: Path, allowed: Site, canary: Site, location: str, entry: str) -> None:
    allowed.redirects["/x"] = (302, location.format(port=canary.port))
    with pytest.raises(AccessDenied, match="refused: .* resolves to .*not globally reachable"):
        fetch(tmp_path, allowed.url(), [allowed.hostport, entry])
    assert canary.seen == []


def test_a_redirect_to_a_url_with_a_backslash_reaches_no_server(
        tmp_path: Path, allowed: Site, canary: Site, sites: Callable[..., Site]) -> None:
    second = sites()
    allowed.redirects["/x"] = (302, f"http://{canary.hostport}\\@{second.hostport}/y")
    with pytest.raises(AccessDenied, match="a backslash in the host part"):
        fetch(tmp_path, allowed.url(), [allowed.hostport, second.hostport])
    assert canary.seen == [] and second.seen == []


def test_a_relative_redirect_stays_on_the_checked_server(tmp_path: Path, allowed: Site) -> None:
    allowed.redirects["/x"] = (301, "/moved")
    assert fetch(tmp_path, allowed.url(), [allowed.hostport]) == f"from {allowed.hostport}".encode()
    assert [s.path for s in allowed.seen] == ["/x", "/moved"]


def test_more_redirects_than_max_redirects_are_refused(tmp_path: Path, allowed: Site) -> None:
    allowed.redirects["/x"] = (302, "/x")
    with pytest.raises(AccessDenied, match="more than 3 redirects"):
        fetch(tmp_path, allowed.url(), [allowed.hostport], max_redirects=3)
    assert len(allowed.seen) == 4


def test_with_max_redirects_zero_a_redirect_is_refused(tmp_path: Path, allowed: Site, canary: Site) -> None:
    allowed.redirects["/x"] = (302, canary.url())
    with pytest.raises(AccessDenied, match="answered 302"):
        fetch(tmp_path, allowed.url(), [allowed.hostport, canary.hostport], max_redirects=0)
    assert canary.seen == []


def test_configured_headers_stay_with_the_first_urls_host_and_port(
        tmp_path: Path, allowed: Site, sites: Callable[..., Site]) -> None:
    second = sites()
    allowed.redirects["/x"] = (302, "/y")
    allowed.redirects["/y"] = (302, second.url("/z"))
    fetch(tmp_path, allowed.url(), [allowed.hostport, second.hostport], headers={"Authorization": "Bearer s3cret"})
    assert [s.headers.get("authorization") for s in allowed.seen] == ["Bearer s3cret", "Bearer s3cret"]
    assert [s.headers.get("authorization") for s in second.seen] == [None]


def test_a_redirect_from_https_to_http_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def answer(method: str, target: Target, address: str, **kwargs: Any) -> requests.Response:
        # an https server needs a certificate: its answer is made here, the guard around it is the real one
        sent.append(f"{target.url} via {address}")
        response = requests.Response()
        response.status_code, response._content_consumed = 302, True
        response.headers["Location"] = "http://files.example.test/y"
        return response

    monkeypatch.setattr(guard_module, "_send", answer)
    resolving(monkeypatch, {"files.example.test": ["127.0.0.1"]})
    guard = HostGuard(["files.example.test:*"], setting="s", private="allow")
    with pytest.raises(AccessDenied, match="to 'http://files.example.test/y' refused: it leaves https"):
        guard.request("GET", "https://files.example.test/x", timeout=1, max_redirects=5)
    assert sent == ["https://files.example.test/x via 127.0.0.1"]


# -- the allow-list's own form ----------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["http://files.example.com", "files.example.com:0", "files.example.com:99999",
                                   "files.example.com:http", "user@files.example.com", "files.example.com/x",
                                   "[::1", "::1:zz", ":8080", "files example.com"])
def test_an_allowed_hosts_entry_that_is_not_host_port_or_star_stops_startup(entry: str) -> None:
    with pytest.raises(ConfigError, match="data_store.allowed_hosts: entry .* is not|has no host|has a port"):
        http_store.validate_config({"allowed_hosts": [entry]})


@pytest.mark.parametrize("entry", ["files.example.com", "files.example.com:8080", "files.example.com:*",
                                   "*.example.com", "*", "*:*", "[::1]:8080", "[::1]", "::1", "10.0.0.5:9000"])
def test_host_host_port_and_host_star_entries_are_accepted(entry: str) -> None:
    http_store.validate_config({"allowed_hosts": [entry]})


@pytest.mark.parametrize("value", [-1, "5", True, 1.5])
def test_max_redirects_must_be_a_whole_number(value: Any) -> None:
    with pytest.raises(ConfigError, match="data_store.max_redirects"):
        http_store.validate_config({"allowed_hosts": ["*"], "max_redirects": value})


def test_an_ipv6_entry_matches_the_same_address_however_it_is_written() -> None:
    guard = HostGuard(["[0:0:0:0:0:0:0:1]:8080"], setting="s")
    target = guard.check("http://[::1]:8080/x")
    assert target.host == "::1" and target.netloc == "[::1]:8080"
    assert guard.resolve(target) == ["::1"]  # named with its port: loopback allowed
