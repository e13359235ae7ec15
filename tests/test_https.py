"""HTTPS input endpoints: the balancer terminates TLS and relays HTTP/1.1, through
restarts and a certificate renewal, with certificates made per test (trustme)."""

from __future__ import annotations

import http.client
import os
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from rolehost import definition
from rolehost.testing import LoadProbe, run_dir_processes
from support.cli import rolehost
from support.net import free_port
from support.roles import WEB
from support.service import MakeService

HTTPS = """
[roles.web.endpoints.http]
port = {port}
protocol = "https"
certificate = "tls/site.pem"
key = "tls/site.key"
drain_timeout = "5s"
[roles.web.endpoints.http.probe]
path = "/healthz"
interval = "200ms"
"""


def issue(ca: trustme.CA, folder: Path, cert: str = "site.pem", key: str = "site.key") -> None:
    """A certificate for 127.0.0.1 signed by `ca`, written whole (renamed into place), as
    a renewal replaces the files."""
    folder.mkdir(exist_ok=True)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    for name, data in ((cert, b"".join(b.bytes() for b in issued.cert_chain_pems)),
                       (key, issued.private_key_pem.bytes())):
        (folder / f".{name}").write_bytes(data)
        os.replace(folder / f".{name}", folder / name)


def trusting(*authorities: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for ca in authorities:
        ca.configure_trust(context)
    return context


def connect(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


def get(connection: http.client.HTTPSConnection, path: str = "/") -> tuple[int, str]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read().decode()


def issuer(connection: http.client.HTTPSConnection) -> str:
    """The organization of the certificate authority that signed the server's certificate."""
    assert connection.sock is not None
    cert = connection.sock.getpeercert()  # type: ignore[attr-defined]
    return str(dict(pair[0] for pair in cert["issuer"])["organizationalUnitName"])


# A client offering TLS 1.1 at most proves the floor; the ssl module warns of the version.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_is_terminated_through_restarts_and_a_renewal_without_a_failed_request(
        make_service: MakeService, tmp_path: Path) -> None:
    first, second = trustme.CA(), trustme.CA()
    issue(first, tmp_path / "tls")
    port = free_port()
    service = make_service(WEB, instances=2, settings={"warmup": "0,0"},
                           role={"stop_timeout": "5s"}, extra=HTTPS.format(port=port))
    trust = trusting(first, second)
    with service.harness(run_dir=tmp_path / "run") as h:
        h.wait_ready(30)
        held = connect(port, trust)  # kept alive across everything below
        status, head = get(held, "/headers")
        assert status == 200 and "X-Forwarded-Proto: https\n" in head, head
        assert "X-Forwarded-For: 127.0.0.1\n" in head
        assert held.sock is not None
        assert held.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
        assert issuer(held) == issuer_of(first)

        # Below TLS 1.2 there is no handshake.
        old = trusting(first)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):
            get(connect(port, old))
        # Nor without the certificate authority's trust.
        with pytest.raises(ssl.SSLCertVerificationError):
            get(connect(port, ssl.create_default_context()))

        with LoadProbe(f"https://127.0.0.1:{port}/", clients=4, context=trust) as load:
            load.wait_requests(100)
            h.restart("web_IN_0")
            h.restart("web_IN_1")
            load.wait_requests(load.requests + 100)

            # A renewal: the files replaced, then a config change. New handshakes get the
            # new certificate; connections open keep theirs, and nothing is dropped.
            issue(second, tmp_path / "tls")
            h.set_setting("web", "renewed", 1)
            fresh = connect(port, trust)
            assert get(fresh)[0] == 200
            assert issuer(fresh) == issuer_of(second)
            fresh.close()
            assert get(held)[0] == 200 and issuer(held) == issuer_of(first)

            # A renewal that cannot serve (a key of another certificate) is refused, the
            # key named: the certificate served, the settings, the instances stay as they were.
            pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
            issue(first, tmp_path / "other")
            os.replace(tmp_path / "other" / "site.key", tmp_path / "tls" / "site.key")
            refused = rolehost("config", "set", "web", "renewed=2", "-f", str(service.toml),
                               "--run-dir", str(h.run_dir.path))
            assert refused.returncode == 2, refused.stderr
            assert (f"roles.web.endpoints.http.key: {tmp_path / 'tls' / 'site.key'} is not "
                    f"the key of the certificate in {tmp_path / 'tls' / 'site.pem'}"
                    ) in refused.stderr
            again = connect(port, trust)
            assert get(again)[0] == 200 and issuer(again) == issuer_of(second)
            again.close()
            assert {i["id"]: i["pid"] for i in h.status()["instances"]} == pids
            load.wait_requests(load.requests + 100)
        assert load.failures == [], load.report()
        held.close()


def issuer_of(ca: trustme.CA) -> str:
    """What `issuer` reads of a certificate `ca` signed."""
    subject = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    return str(subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value)


GOOD = """
[service]
name = "shop"

[roles.web]
entry_point = "app:Web"

[roles.web.endpoints.site]
port = 18443
protocol = "https"
certificate = "tls/site.pem"
key = "tls/site.key"
"""
APP = "from rolehost import RoleEntryPoint\nclass Web(RoleEntryPoint): pass\n"


@pytest.mark.parametrize("problem", ["missing-certificate", "missing-key", "key-mismatch",
                                     "not-a-certificate"])
@pytest.mark.parametrize("command", ["start", "check"])
def test_a_certificate_that_cannot_serve_is_a_definition_error(
        tmp_path: Path, problem: str, command: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "rolehost.toml").write_text(GOOD)
    tls = tmp_path / "tls"
    issue(trustme.CA(), tls)
    if problem == "missing-certificate":
        (tls / "site.pem").unlink()
        expected = (f"roles.web.endpoints.site.certificate: expected a PEM file, found none "
                    f"at {tls / 'site.pem'}")
    elif problem == "missing-key":
        (tls / "site.key").unlink()
        expected = (f"roles.web.endpoints.site.key: expected a PEM file, found none at "
                    f"{tls / 'site.key'}")
    elif problem == "key-mismatch":
        issue(trustme.CA(), tls, cert="other.pem")
        expected = (f"roles.web.endpoints.site.key: {tls / 'site.key'} is not the key of the "
                    f"certificate in {tls / 'site.pem'}")
    else:
        (tls / "site.pem").write_text("not a certificate\n")
        expected = f"roles.web.endpoints.site.certificate: expected a PEM certificate in {tls}"
    done = rolehost(command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"rolehost.toml: {expected}" in done.stderr, done.stderr
    assert not (tmp_path / ".rolehost" / "control.sock").exists()
    assert not run_dir_processes(tmp_path / ".rolehost")


def test_a_site_may_serve_an_https_endpoint(tmp_path: Path) -> None:
    """The balancer terminates TLS: behind an https endpoint a web role's site serves
    http, as it does behind an http one."""
    issue(trustme.CA(), tmp_path / "tls")
    raw = {"service": {"name": "s"}, "roles": {"web": {
        "site": {"asgi": "shop:app"},
        "endpoints": {"site": {"port": 18443, "protocol": "https",
                               "certificate": "tls/site.pem", "key": "tls/site.key"}}}}}
    role = definition.parse(raw, tmp_path / "rolehost.toml").roles["web"]
    assert role.endpoints["site"].certificate == tmp_path / "tls" / "site.pem"
    raw["roles"]["web"]["endpoints"]["site"] = {"port": 18443, "protocol": "tcp"}
    with pytest.raises(definition.DefinitionErrors, match="expected an http endpoint"):
        definition.parse(raw)
