"""Tests for harpsync.security: node keys, CSR signing, live trust and real TLS sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harpsync.security import (
    NodeKeys,
    PeerIdentity,
    hash_password,
    parse_authorization,
    peer_identity,
    serial_to_hex,
    verify_password,
)

# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def a(tmp_path: Path) -> NodeKeys:
    """Keys for node "a", reachable at 127.0.0.1."""
    return NodeKeys.load_or_create(tmp_path / "a", "a", ["127.0.0.1"])


@pytest.fixture
def b(tmp_path: Path) -> NodeKeys:
    """Keys for node "b", with a DNS and an IP host."""
    return NodeKeys.load_or_create(tmp_path / "b", "b", ["b.example.com", "10.0.0.2"])


@contextlib.asynccontextmanager
async def serving(keys: NodeKeys) -> AsyncIterator[tuple[int, list[PeerIdentity | None]]]:
    """Run a real TLS server with ``keys.server_context()`` that greets with ``ok``."""
    seen: list[PeerIdentity | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=keys.server_context())
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def exchange(
    port: int, ctx: ssl.SSLContext, hostname: str = "a", seen_server: list | None = None
) -> str:
    """Dial, read the greeting, and return "ok", "eof" or the exception's class name."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname), 5
        )
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    try:
        if seen_server is not None:
            seen_server.append(peer_identity(writer.get_extra_info("ssl_object")))
        line = await asyncio.wait_for(reader.readline(), 5)
        return "ok" if line == b"ok\n" else "eof"
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _mode(path: Path) -> int:
    """Permission bits of a file."""
    return stat.S_IMODE(path.stat().st_mode)


def _san_strings(cert: x509.Certificate) -> set[str]:
    """All SAN values of a certificate as strings."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v.value) for v in san}


# ------------------------------------------------------------------------ key files


def test_generation_creates_files_and_private_key_modes(a: NodeKeys) -> None:
    """First load writes ca/node certs and 0600 keys plus the trusted/ directory."""
    for name in ("ca.pem", "ca.key", "node.pem", "node.key"):
        assert (a.keys_dir / name).is_file()
    assert _mode(a.keys_dir / "ca.key") == 0o600
    assert _mode(a.node_key_path) == 0o600
    assert (a.keys_dir / "trusted").is_dir()
    key = serialization.load_pem_private_key(a.node_key_path.read_bytes(), None)
    assert key.curve.name == "secp256r1"  # type: ignore[union-attr]


def test_ca_and_node_certificate_contents(a: NodeKeys) -> None:
    """The CA is a cert-signing CA named after the node; the node cert has both EKUs."""
    ca = a.ca_cert
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "harpsync CA a"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    node = a.node_cert
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    node.verify_directly_issued_by(ca)
    assert (node.not_valid_after_utc - node.not_valid_before_utc).days >= 3649


def test_sans_hold_node_name_hosts_localhost_and_loopback(b: NodeKeys) -> None:
    """SANs contain the node name, every host (IP as IPAddress) and localhost/127.0.0.1."""
    san = b.node_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"b", "b.example.com", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.2",
        "127.0.0.1",
    }


def test_unicode_node_name_uses_idna_san(tmp_path: Path) -> None:
    """A non-ASCII node name keeps its CN and gets an IDNA A-label DNS SAN."""
    keys = NodeKeys.load_or_create(tmp_path / "u", "nöde", ["::1"])
    assert keys.node_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nöde"
    assert {"xn--nde-sna", "::1"} <= _san_strings(keys.node_cert)
    again = NodeKeys.load_or_create(tmp_path / "u", "nöde", ["::1"])
    assert again.serial_hex == keys.serial_hex


def test_reload_keeps_ca_and_node_certificate(tmp_path: Path, a: NodeKeys) -> None:
    """Loading again with the same names keeps the CA serial and the node cert."""
    again = NodeKeys.load_or_create(tmp_path / "a", "a", ["127.0.0.1"])
    assert again.ca_cert.serial_number == a.ca_cert.serial_number
    assert again.ca_pem == a.ca_pem
    assert again.serial_hex == a.serial_hex


def test_reload_with_new_host_reissues_node_cert_from_same_ca(
    tmp_path: Path, a: NodeKeys
) -> None:
    """A host not covered by the SANs re-issues the node cert but keeps the CA."""
    again = NodeKeys.load_or_create(tmp_path / "a", "a", ["127.0.0.1", "a.example.org"])
    assert again.ca_pem == a.ca_pem
    assert again.serial_hex != a.serial_hex
    assert "a.example.org" in _san_strings(again.node_cert)
    again.node_cert.verify_directly_issued_by(a.ca_cert)
    assert again.node_cert.public_key() == a.node_cert.public_key()


def test_refuses_to_replace_a_half_missing_ca(tmp_path: Path, a: NodeKeys) -> None:
    """A keys dir with ca.pem but no ca.key raises instead of minting a new CA."""
    (tmp_path / "a" / "ca.key").unlink()
    with pytest.raises(ValueError, match="ca.key"):
        NodeKeys.load_or_create(tmp_path / "a", "a", [])


def test_ca_info_matches_openssl_formatting(a: NodeKeys) -> None:
    """ca_info has Harper's keys and the same serial/date text OpenSSL produces."""
    info = a.ca_info()
    assert info["issuer"] == info["subject"] == "CN=harpsync CA a"
    decoded = ssl._ssl._test_decode_cert(str(a.ca_path))  # type: ignore[attr-defined]
    assert info["serialNumber"] == decoded["serialNumber"]
    assert info["validFrom"] == decoded["notBefore"]
    assert info["validTo"] == decoded["notAfter"]
    assert re.fullmatch(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT", info["validTo"])


def test_serial_hex_is_even_length_upper_case() -> None:
    """serial_to_hex pads to whole bytes like getpeercert's serialNumber."""
    assert serial_to_hex(0xABC) == "0ABC"
    assert serial_to_hex(0x1F2E) == "1F2E"


def test_https_files_and_cached_server_context(a: NodeKeys) -> None:
    """https_files names the node cert/key and server_context is cached."""
    assert a.https_files() == (str(a.node_cert_path), str(a.node_key_path))
    ctx = a.server_context()
    assert ctx is a.server_context()
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# ----------------------------------------------------------------------- real TLS


async def test_untrusted_client_certificate_fails_handshake(a: NodeKeys, b: NodeKeys) -> None:
    """With CERT_OPTIONAL a client cert the server cannot verify fails the handshake."""
    async with serving(a) as (port, seen):
        outcome = await exchange(port, b.client_context(verify=False))
    # TLS 1.3: the client finishes first and sees the server's alert as EOF on read.
    assert outcome != "ok"
    assert seen == []


async def test_untrusted_client_certificate_fails_on_tls12(a: NodeKeys, b: NodeKeys) -> None:
    """Under TLS 1.2 the same rejection surfaces during the client's handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(b.node_cert_path, b.node_key_path)
    async with serving(a) as (port, seen):
        outcome = await exchange(port, ctx)
    assert outcome in {"ConnectionResetError", "SSLError", "eof"}
    assert seen == []


async def test_client_without_certificate_is_accepted_without_identity(
    a: NodeKeys, b: NodeKeys
) -> None:
    """A client presenting no certificate connects, and the server sees no identity."""
    async with serving(a) as (port, seen):
        outcome = await exchange(port, b.client_context(verify=False, present_cert=False))
    assert outcome == "ok"
    assert seen == [None]


async def test_trust_ca_updates_live_contexts_for_mutual_tls(a: NodeKeys, b: NodeKeys) -> None:
    """trust_ca on already-created contexts makes the next handshake mutually verified."""
    server_ctx = a.server_context()
    client_ctx = b.client_context()
    async with serving(a) as (port, seen):
        assert await exchange(port, client_ctx) == "SSLCertVerificationError"
        assert a.trust_ca(b.ca_pem) is True
        assert b.trust_ca(a.ca_pem) is True
        client_seen: list[PeerIdentity | None] = []
        assert await exchange(port, client_ctx, seen_server=client_seen) == "ok"
    assert a.server_context() is server_ctx and b.client_context() is client_ctx
    assert seen == [PeerIdentity("b", b.serial_hex, ("b", "b.example.com", "10.0.0.2",
                                                       "localhost", "127.0.0.1"))]
    assert client_seen[0] is not None
    assert (client_seen[0].common_name, client_seen[0].serial_hex) == ("a", a.serial_hex)


async def test_verified_client_checks_ip_hostname(a: NodeKeys, b: NodeKeys) -> None:
    """A verifying client dialing 127.0.0.1 succeeds once it trusts the CA, not before."""
    ctx = b.client_context(present_cert=False)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    async with serving(a) as (port, _seen):
        assert await exchange(port, ctx, "127.0.0.1") == "SSLCertVerificationError"
        b.trust_ca(a.ca_pem)
        assert await exchange(port, ctx, "127.0.0.1") == "ok"
        assert await exchange(port, ctx, "not-a.example") == "SSLCertVerificationError"


async def test_certificates_pass_strict_x509_verification(a: NodeKeys) -> None:
    """Our CA and node certs satisfy OpenSSL's VERIFY_X509_STRICT checks."""
    ctx = ssl.create_default_context(cafile=str(a.ca_path))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    async with serving(a) as (port, _seen):
        assert await exchange(port, ctx, "127.0.0.1") == "ok"


async def test_trusted_ca_persists_across_reload(tmp_path: Path, a: NodeKeys, b: NodeKeys) -> None:
    """A CA trusted before a restart is loaded into the reloaded node's server context."""
    a.trust_ca(b.ca_pem)
    b.trust_ca(a.ca_pem)
    reloaded = NodeKeys.load_or_create(tmp_path / "a", "a", ["127.0.0.1"])
    async with serving(reloaded) as (port, seen):
        assert await exchange(port, b.client_context()) == "ok"
    assert seen[0] is not None and seen[0].common_name == "b"


async def test_peer_signed_certificate_is_presented_to_that_peer(
    a: NodeKeys, b: NodeKeys
) -> None:
    """After a join, B dials A with the cert A's CA signed and A verifies it."""
    b.trust_ca(a.ca_pem)
    signed = a.sign_csr(b.make_csr(), "b", "10.0.0.2").pem.encode()
    b.store_peer_signed_cert("a", signed)
    assert (b.keys_dir / "peer_certs" / "a.pem").read_bytes() == signed
    serial = serial_to_hex(x509.load_pem_x509_certificate(signed).serial_number)
    async with serving(a) as (port, seen):
        assert await exchange(port, b.client_context(peer_name="a")) == "ok"
        assert await exchange(port, b.client_context()) != "ok"  # a never trusted b's CA
    assert len(seen) == 1 and seen[0] is not None
    assert (seen[0].common_name, seen[0].serial_hex) == ("b", serial)
    assert "10.0.0.2" in seen[0].sans


# -------------------------------------------------------------------- trust & CSRs


def test_trust_ca_is_idempotent_and_persisted(a: NodeKeys, b: NodeKeys) -> None:
    """trust_ca writes trusted/<sha256>.pem once and returns False on repeats."""
    assert a.trust_ca(b.ca_pem) is True
    assert a.trust_ca(b.ca_pem.decode()) is False
    assert a.trust_ca(a.ca_pem) is False
    files = list((a.keys_dir / "trusted").glob("*.pem"))
    assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{64}\.pem", files[0].name)


@pytest.mark.parametrize("which", ["node_cert", "garbage", "two"])
def test_trust_ca_rejects_non_ca_input(a: NodeKeys, b: NodeKeys, which: str) -> None:
    """A leaf certificate, garbage, or several certificates are refused with ValueError."""
    value = {"node_cert": b.node_cert_pem, "garbage": b"hello", "two": b.ca_pem + a.ca_pem}
    with pytest.raises(ValueError):
        a.trust_ca(value[which])


def test_sign_csr_issues_cert_verifying_against_signer_ca(a: NodeKeys, b: NodeKeys) -> None:
    """B's CSR signed by A's CA names B, carries only B's name and URL host as SANs (not
    what the CSR asked for), keeps B's key and chains to A's CA."""
    csr = x509.load_pem_x509_csr(b.make_csr())
    assert csr.is_signature_valid
    issued = a.sign_csr(b.make_csr(), "b", "10.0.0.2", days=30)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    cert.verify_directly_issued_by(a.ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "b"
    assert _san_strings(cert) == {"b", "10.0.0.2"}
    assert issued.pin == b.pin
    assert issued.serial_hex == serial_to_hex(cert.serial_number)
    assert cert.public_key() == b.node_cert.public_key()
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_sign_csr_rejects_garbage_and_bad_signature(a: NodeKeys, b: NodeKeys) -> None:
    """A non-CSR and a CSR with a tampered signature both raise ValueError."""
    with pytest.raises(ValueError, match="Invalid CSR"):
        a.sign_csr("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
                   "b", None)
    with pytest.raises(ValueError, match="Invalid CSR"):
        a.sign_csr(b"garbage", "b", None)
    der = bytearray(x509.load_pem_x509_csr(b.make_csr()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="signature"):
        a.sign_csr(tampered, "b", None)


def test_sign_csr_refuses_a_csr_for_another_name(a: NodeKeys, b: NodeKeys) -> None:
    """A CSR whose CN is not the joining node's name is refused."""
    with pytest.raises(ValueError, match="names 'b'"):
        a.sign_csr(b.make_csr(), "mallory", None)


def test_store_peer_signed_cert_validates_input(a: NodeKeys, b: NodeKeys) -> None:
    """A cert for another key or a path-like peer name is refused."""
    with pytest.raises(ValueError, match="key"):
        b.store_peer_signed_cert("a", a.node_cert_pem)
    with pytest.raises(ValueError, match="peer name"):
        b.store_peer_signed_cert("../a", a.sign_csr(b.make_csr(), "b", None).pem)


def test_peer_identity_of_none_is_none() -> None:
    """No SSL object means no identity."""
    assert peer_identity(None) is None


# ---------------------------------------------------------------------- passwords


def test_password_round_trip_and_format() -> None:
    """A hash verifies its password, rejects others, and uses the scrypt$ format."""
    stored = hash_password("s3cret!")
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]+", stored)
    assert verify_password("s3cret!", stored)
    assert not verify_password("s3cret", stored)
    assert not verify_password("", stored)


def test_password_hashes_are_salted() -> None:
    """Two hashes of one password differ but both verify."""
    one, two = hash_password("pw"), hash_password("pw")
    assert one != two
    assert verify_password("pw", one) and verify_password("pw", two)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain",
        "scrypt$16384$8$1$abc",
        "argon2$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$16384$8$1$not*base64$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$1048576$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$16383$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
        None,
    ],
)
def test_verify_password_malformed_stored_is_false(stored: str) -> None:
    """Malformed or abusive stored strings make verify_password return False."""
    assert verify_password("pw", stored) is False


# ------------------------------------------------------------------ authorization


def test_parse_authorization_dict_and_basic_header() -> None:
    """Both the object form and a Basic header yield (username, password)."""
    assert parse_authorization({"username": "admin", "password": "p:w"}) == ("admin", "p:w")
    assert parse_authorization("Basic YWRtaW46cDp3") == ("admin", "p:w")
    assert parse_authorization("basic YWRtaW46") == ("admin", "")
    assert parse_authorization(None) is None
    assert parse_authorization("") is None


@pytest.mark.parametrize(
    "value",
    ["Basic !!!notbase64", "Basic YWRtaW4=", "Bearer abc", {"username": "admin"}, 42],
)
def test_parse_authorization_malformed_raises(value: object) -> None:
    """Bad base64, a missing colon, other schemes or incomplete objects raise ValueError."""
    with pytest.raises(ValueError) as info:
        parse_authorization(value)  # type: ignore[arg-type]
    assert "notbase64" not in str(info.value)


def test_parse_authorization_bad_base64_message() -> None:
    """Malformed base64 reports an 'Invalid character' message."""
    with pytest.raises(ValueError, match="Invalid character"):
        parse_authorization("Basic a$b")
