"""TLS for https input endpoints: the balancer terminates it with the standard library's
`ssl`, and relays plain HTTP/1.1 to the instances.

One server context per endpoint, with the library's defaults for a server (its cipher
list, no compression, no SSLv3) and TLS 1.2 at least. A certificate is renewed by
loading the new chain into that same context: connections open keep the session they
have, and the next handshake takes the new certificate; nothing is closed or rebound.
The files are checked before any is loaded, so a bad renewal changes nothing.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from rolehost.definition import Definition, DefinitionError, Endpoint, Protocol


class CertificateProblem(ValueError):
    """A certificate or key that cannot serve: `key` names which (certificate or key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


def server_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """A server context serving `certificate` (a PEM chain) with `key`; CertificateProblem
    naming the file at fault."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the relay speaks HTTP/1.1 only
    context.options |= ssl.OP_NO_RENEGOTIATION
    _load(context, certificate, key)
    return context


def check(certificate: Path, key: Path) -> None:
    """CertificateProblem unless the files make a pair a server can serve."""
    _load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), certificate, key)


def renew(context: ssl.SSLContext, certificate: Path, key: Path) -> None:
    """Serve the files' current certificate from now on, if they make a good pair (checked
    in a context of their own first: CertificateProblem, and `context` is untouched)."""
    check(certificate, key)
    _load(context, certificate, key)


def _load(context: ssl.SSLContext, certificate: Path, key: Path) -> None:
    for name, path in (("certificate", certificate), ("key", key)):
        if not path.is_file():
            raise CertificateProblem(name, f"expected a PEM file, found none at {path}")
    try:
        # A certificate alone first, so that a bad one is told from a bad key.
        ssl.create_default_context().load_verify_locations(cafile=certificate)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise CertificateProblem("certificate", f"expected a PEM certificate in "
                                 f"{certificate}: {_reason(exc)}") from None
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise CertificateProblem("key", f"{key} is not the key of the certificate in "
                                     f"{certificate}") from None
        raise CertificateProblem("key", f"expected a PEM private key (unencrypted) in "
                                 f"{key}: {_reason(exc)}") from None
    except OSError as exc:
        raise CertificateProblem("key", f"cannot read {key}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def https(definition: Definition) -> dict[str, Endpoint]:
    """The https endpoints of a definition, by key path (`roles.ROLE.endpoints.NAME`)."""
    return {f"roles.{role_name}.endpoints.{name}": endpoint
            for role_name, role in definition.roles.items()
            for name, endpoint in role.endpoints.items() if endpoint.protocol is Protocol.https}


def problems(definition: Definition, file: Path | None) -> list[DefinitionError]:
    """One error for each https endpoint whose certificate and key cannot serve, naming
    the key at fault: what `check` and `start` refuse before anything starts."""
    found = []
    for path, endpoint in https(definition).items():
        assert endpoint.certificate is not None and endpoint.key is not None
        try:
            check(endpoint.certificate, endpoint.key)
        except CertificateProblem as problem:
            found.append(DefinitionError(file, f"{path}.{problem.key}", problem.message))
    return found
