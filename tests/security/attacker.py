"""What an attacker holds and does: certificates made with ``cryptography``, raw
``/.node`` requests and replication sockets opened by hand."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from harpsync import codec

SUBPROTOCOL = "harpsync-replication-1"
PEM = serialization.Encoding.PEM


def load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


def new_ca(name: str) -> tuple[Any, x509.Certificate]:
    """A fresh self-signed CA (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def mint(ca_key: Any, ca_cert: x509.Certificate, common_name: str, out: Path,
         key: Any = None, sans: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Path:
    """Write ``out/node.pem`` + ``out/node.key``: a leaf named ``common_name`` signed by
    the given CA, for ``key`` (a fresh key if None). Returns ``out``."""
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "node.pem").write_bytes(cert.public_bytes(PEM))
    (out / "node.key").write_bytes(key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


def mint_with_node_ca(node_root: Path, common_name: str, out: Path,
                      same_key: bool = False) -> Path:
    """A certificate minted with the CA key a node holds (``<root>/keys/ca.key``)."""
    keys = node_root / "keys"
    key = load_key(keys / "node.key") if same_key else None
    return mint(load_key(keys / "ca.key"), load_cert(keys / "ca.pem"), common_name, out, key)


def csr(key: Any, common_name: str, sans: tuple[str, ...]) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(PEM).decode()


def client_context(cert_dir: Path | None = None, cert: str = "node.pem",
                   key: str = "node.key") -> ssl.SSLContext:
    """A TLS client context that does not check the server and presents
    ``cert_dir/cert`` (nothing if ``cert_dir`` is None)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / cert, cert_dir / key)
    return ctx


def node_request(url: str, body: dict[str, Any], context: ssl.SSLContext) -> dict[str, Any]:
    """One raw ``/.node`` request; returns the decoded answer."""

    async def run() -> dict[str, Any]:
        async with connect(url + "/.node", ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                           open_timeout=10, close_timeout=2, proxy=None,
                           max_size=2**24) as ws:
            await ws.send(codec.pack(body))
            answer = codec.unpack(await asyncio.wait_for(ws.recv(), 20))
            assert isinstance(answer, dict)
            return answer

    return asyncio.run(run())


def dial_outcome(url: str, context: ssl.SSLContext, deadline: float = 5.0) -> tuple[str, Any]:
    """Open a replication socket and report how the listener treated it.

    ``("closed", code)``: the WebSocket opened and the server closed it (within
    ``deadline``); ``("refused", error)``: TLS or the HTTP upgrade failed; ``("open",
    None)``: the server kept the socket open, i.e. accepted us as a peer.
    """

    async def run() -> tuple[str, Any]:
        try:
            ws = await connect(url, ssl=context, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               open_timeout=5, close_timeout=2, proxy=None)
        except (TimeoutError, OSError, ssl.SSLError, InvalidHandshake, EOFError) as exc:
            return "refused", repr(exc)
        try:
            await asyncio.wait_for(ws.wait_closed(), deadline)
        except TimeoutError:
            await ws.close()
            return "open", None
        if ws.close_code is not None:
            return "closed", ws.close_code
        return "closed", None

    try:
        return asyncio.run(run())
    except ConnectionClosed as exc:
        return "closed", exc.rcvd.code if exc.rcvd else None
