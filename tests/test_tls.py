"""MLLP over TLS: a listener with ``listen.tls`` answers TLS clients that trust its CA, gives a plaintext
client nothing, and with ``client_ca_file`` (mutual TLS) refuses senders without a certificate signed by
that CA. ``hl7engine send --tls`` talks to it.

A throwaway PKI is made for each module: a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate, and a second, untrusted CA with a client certificate of its own. With the ``cryptography``
package when it is installed, else with the ``openssl`` command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.mllp.client import MLLPClient
from engine.mllp.framing import frame
from tests.conftest import RunningEngine, children_of, engine_env, free_port, start_engine, store_url
from tests.support import read_ack, store_rows

_SCRIPT = Path(sys.executable).with_name("hl7engine")
# the installed command; ``python -m engine.cli`` where it is not beside this interpreter
HL7ENGINE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "engine.cli"]


# -- a throwaway PKI --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts
    rogue_cert: Path  # a client certificate signed by it
    rogue_key: Path


def _make_pki_cryptography(d: Path) -> PKI:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, stem: str) -> tuple[Path, Path]:
        crt, pem = d / f"{stem}.crt", d / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return crt, pem

    def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def make_leaf(cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
                  ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca, ca_key = make_ca("HL7 test CA")
    ca_path, _ = save(ca, ca_key, "ca")
    server_cert, server_key = save(*make_leaf("hl7engine", ca, ca_key, server=True), "server")
    client_cert, client_key = save(*make_leaf("lis-sender", ca, ca_key, server=False), "client")
    rogue, rogue_key = make_ca("Rogue CA")
    rogue_path, _ = save(rogue, rogue_key, "rogue-ca")
    rogue_cert, rogue_client_key = save(*make_leaf("lis-sender", rogue, rogue_key, server=False), "rogue-client")
    return PKI(ca_path, server_cert, server_key, client_cert, client_key, rogue_path, rogue_cert, rogue_client_key)


def _make_pki_openssl(d: Path) -> PKI:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    def make_ca(stem: str, cn: str) -> None:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{stem}.key", "-out", f"{stem}.crt", "-days", "1", "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")

    def make_leaf(stem: str, cn: str, ca: str, ext: str) -> None:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{stem}.key",
            "-out", f"{stem}.csr", "-subj", f"/CN={cn}")
        (d / f"{stem}.ext").write_text(ext)
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{stem}.crt", "-days", "1", "-extfile", f"{stem}.ext")

    make_ca("ca", "HL7 test CA")
    make_leaf("server", "hl7engine", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                           "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    make_leaf("client", "lis-sender", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    make_ca("rogue-ca", "Rogue CA")
    make_leaf("rogue-client", "lis-sender", "rogue-ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return PKI(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "rogue-ca.crt", d / "rogue-client.crt", d / "rogue-client.key")


def make_pki(d: Path) -> PKI:
    d.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _make_pki_openssl(d)
    return _make_pki_cryptography(d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- engines with TLS listeners ---------------------------------------------------------------------

def tls_channel(config: Path, port: int, pki: PKI, *, mutual: bool = False, min_version: str | None = None,
                cert: str | None = None, key: str | None = None) -> None:
    (config / "channels").mkdir(parents=True, exist_ok=True)
    text = (
        "name: tls\n"
        "listen:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "  tls:\n"
        f"    cert_file: {cert or pki.server_cert}\n"
        f"    key_file: {key or pki.server_key}\n"
    )
    if mutual:
        text += f"    client_ca_file: {pki.ca}\n"
    if min_version:
        text += f"    min_version: '{min_version}'\n"
    text += "accept:\n  processing_ids: [P, T, D]\n"
    (config / "channels" / "tls.yaml").write_text(text, encoding="utf-8")


@contextlib.contextmanager
def tls_engine(config: Path, pki: PKI, **kwargs: object) -> Iterator[RunningEngine]:
    port = free_port()
    tls_channel(config, port, pki, **kwargs)  # type: ignore[arg-type]
    eng = start_engine(config, port, engine_env(config, None))
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[RunningEngine]:
    with tls_engine(tmp_path_factory.mktemp("tls"), pki) as eng:
        yield eng


@pytest.fixture(scope="module")
def mutual_server(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[RunningEngine]:
    with tls_engine(tmp_path_factory.mktemp("mtls"), pki, mutual=True) as eng:
        yield eng


def client_context(pki: PKI, *, cert: bool = False, rogue: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(pki.rogue_cert if rogue else pki.client_cert),
                            str(pki.rogue_key if rogue else pki.client_key))
    return ctx


def msg(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LIS|LAB|HL7ENGINE|CENTRAL|20260101120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r"
            "PID|1||123^^^LAB^MR||DOE^JANE\r").encode()


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


def tls_send(eng: RunningEngine, ctx: ssl.SSLContext, control_id: str, server_hostname: str | None = None) -> bytes:
    with MLLPClient(*eng.address, timeout=10, tls=ctx, server_hostname=server_hostname) as client:
        answer = client.send(msg(control_id), 10)
    assert answer is not None, f"no ACK for {control_id}"
    return answer


def assert_accepted(answer: bytes, control_id: str) -> None:
    ack = read_ack(answer)
    assert (ack.code, ack.control_id) == ("AA", control_id), answer


def refused(eng: RunningEngine, ctx: ssl.SSLContext, control_id: str) -> str:
    """Try to send over TLS with ``ctx``; return how it failed. Fails the test if an ACK came back.

    With TLS 1.3 the client finishes its handshake before the server has checked the client's
    certificate, so the refusal can show up at the handshake, at the first write or at the first read.
    """
    try:
        with MLLPClient(*eng.address, timeout=5, tls=ctx) as client:
            answer = client.send(msg(control_id), 5)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return type(exc).__name__
    assert answer is None, f"expected no ACK, got {answer!r}"
    return "no answer"


def stored_control_ids(eng: RunningEngine) -> set[str]:
    with contextlib.suppress(Exception):
        return {r["control_id"] for r in store_rows(store_url(eng))}
    return set()


# -- TLS ------------------------------------------------------------------------------------------------

def test_tls_client_trusting_the_ca_gets_aa(server: RunningEngine, pki: PKI) -> None:
    ctrl = uid("TLS")
    assert_accepted(tls_send(server, client_context(pki), ctrl), ctrl)
    assert ctrl in stored_control_ids(server)


def test_server_certificate_names_localhost_too(server: RunningEngine, pki: PKI) -> None:
    ctrl = uid("LOCAL")
    assert_accepted(tls_send(server, client_context(pki), ctrl, server_hostname="localhost"), ctrl)


def test_several_messages_on_one_tls_connection(server: RunningEngine, pki: PKI) -> None:
    ids = [uid("MANY") for _ in range(5)]
    with MLLPClient(*server.address, timeout=10, tls=client_context(pki)) as client:
        for ctrl in ids:
            answer = client.send(msg(ctrl), 10)
            assert answer is not None
            assert_accepted(answer, ctrl)


def test_client_not_trusting_the_server_refuses_it(server: RunningEngine, pki: PKI) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.rogue_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        MLLPClient(*server.address, timeout=5, tls=ctx)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not name this host
        MLLPClient(*server.address, timeout=5, tls=ctx, server_hostname="lab.example.org")


def test_plaintext_client_gets_no_ack(server: RunningEngine, pki: PKI) -> None:
    ctrl = uid("PLAIN")
    received = b""
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(frame(msg(ctrl)))
        deadline = time.monotonic() + 3
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break  # closed by the engine
                received += chunk
    assert b"MSA" not in received and b"\x0b" not in received, received
    # the engine goes on serving TLS clients
    after = uid("AFTER")
    assert_accepted(tls_send(server, client_context(pki), after), after)
    ids = stored_control_ids(server)
    assert after in ids and ctrl not in ids
    assert server.proc.poll() is None


def test_many_plaintext_clients_do_not_disturb_tls(server: RunningEngine, pki: PKI) -> None:
    socks = []
    try:
        for _ in range(10):
            s = socket.create_connection(server.address, timeout=5)
            s.sendall(b"\x0bnot TLS at all\x1c\r" * 50)
            socks.append(s)
        ctrl = uid("BUSY")
        assert_accepted(tls_send(server, client_context(pki), ctrl), ctrl)
    finally:
        for s in socks:
            s.close()


def test_min_version_13_refuses_tls_12(tmp_path: Path, pki: PKI) -> None:
    with tls_engine(tmp_path, pki, min_version="1.3") as eng:
        old = client_context(pki)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            MLLPClient(*eng.address, timeout=5, tls=old)
        ctrl = uid("TLS13")
        assert_accepted(tls_send(eng, client_context(pki), ctrl), ctrl)


def test_tls_12_is_accepted_by_default(server: RunningEngine, pki: PKI) -> None:
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctrl = uid("TLS12")
    assert_accepted(tls_send(server, ctx, ctrl), ctrl)


# -- mutual TLS -------------------------------------------------------------------------------------

def test_mutual_tls_refuses_a_client_without_certificate(mutual_server: RunningEngine, pki: PKI) -> None:
    anonymous = uid("ANON")
    refused(mutual_server, client_context(pki), anonymous)
    ctrl = uid("MTLS")
    assert_accepted(tls_send(mutual_server, client_context(pki, cert=True), ctrl), ctrl)
    ids = stored_control_ids(mutual_server)
    assert ctrl in ids and anonymous not in ids


def test_mutual_tls_accepts_a_ca_signed_client(mutual_server: RunningEngine, pki: PKI) -> None:
    ids = [uid("MTLS"), uid("MTLS")]
    for ctrl in ids:
        assert_accepted(tls_send(mutual_server, client_context(pki, cert=True), ctrl), ctrl)
    assert set(ids) <= stored_control_ids(mutual_server)


def test_mutual_tls_refuses_a_certificate_from_another_ca(mutual_server: RunningEngine, pki: PKI) -> None:
    rogue = uid("ROGUE")
    refused(mutual_server, client_context(pki, cert=True, rogue=True), rogue)
    assert mutual_server.proc.poll() is None
    ctrl = uid("MTLS")
    assert_accepted(tls_send(mutual_server, client_context(pki, cert=True), ctrl), ctrl)
    ids = stored_control_ids(mutual_server)
    assert ctrl in ids and rogue not in ids


# -- hl7engine send --tls ---------------------------------------------------------------------------

def cli_send(eng: RunningEngine, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HL7ENGINE, "send", *options, f"127.0.0.1:{eng.port}", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_cli_send_tls_with_ca(server: RunningEngine, pki: PKI, tmp_path: Path) -> None:
    ids = [uid("CLI"), uid("CLI")]
    (tmp_path / "two.hl7").write_bytes(msg(ids[0]) + msg(ids[1]))
    result = cli_send(server, tmp_path / "two.hl7", "--tls", "--ca", str(pki.ca))
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"two.hl7#1: AA {ids[0]}", f"two.hl7#2: AA {ids[1]}"]


def test_cli_send_tls_without_ca_does_not_verify(server: RunningEngine, tmp_path: Path) -> None:
    ctrl = uid("NOCA")
    (tmp_path / "one.hl7").write_bytes(msg(ctrl))
    result = cli_send(server, tmp_path / "one.hl7", "--tls")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"one.hl7: AA {ctrl}"]


def test_cli_send_tls_with_the_wrong_ca_fails(server: RunningEngine, pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "one.hl7").write_bytes(msg(uid("WRONGCA")))
    result = cli_send(server, tmp_path / "one.hl7", "--tls", "--ca", str(pki.rogue_ca))
    assert result.returncode == 2, result
    assert "certificate verify failed" in result.stderr
    assert result.stdout == ""


def test_cli_send_plaintext_to_tls_listener_fails(server: RunningEngine, tmp_path: Path) -> None:
    (tmp_path / "one.hl7").write_bytes(msg(uid("PLAINCLI")))
    result = cli_send(server, tmp_path / "one.hl7", "--timeout", "3")
    assert result.returncode != 0, result
    assert " AA " not in result.stdout


@pytest.mark.parametrize("option", ["--ca", "--cert"])
def test_cli_send_missing_tls_file_is_a_usage_error(server: RunningEngine, tmp_path: Path, option: str) -> None:
    (tmp_path / "one.hl7").write_bytes(msg(uid("NOFILE")))
    missing = tmp_path / "missing.pem"
    result = cli_send(server, tmp_path / "one.hl7", "--tls", option, str(missing))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert "missing.pem" in result.stderr


def test_cli_send_mutual_tls(mutual_server: RunningEngine, pki: PKI, tmp_path: Path) -> None:
    ctrl = uid("CLIM")
    (tmp_path / "one.hl7").write_bytes(msg(ctrl))
    ok = cli_send(mutual_server, tmp_path / "one.hl7", "--tls", "--ca", str(pki.ca), "--cert",
                  str(pki.client_cert), "--key", str(pki.client_key))
    assert ok.returncode == 0, ok
    assert ok.stdout.splitlines() == [f"one.hl7: AA {ctrl}"]
    no_cert = cli_send(mutual_server, tmp_path / "one.hl7", "--tls", "--ca", str(pki.ca), "--timeout", "3")
    assert no_cert.returncode != 0, no_cert
    assert " AA " not in no_cert.stdout


# -- TLS files in the configuration directory -----------------------------------------------------

def test_relative_tls_paths_work_from_any_working_directory(tmp_path: Path, pki: PKI) -> None:
    config = tmp_path / "conf"
    (config / "tls").mkdir(parents=True)
    (config / "tls" / "server.crt").write_bytes(pki.server_cert.read_bytes())
    (config / "tls" / "server.key").write_bytes(pki.server_key.read_bytes())
    port = free_port()
    tls_channel(config, port, pki, cert="tls/server.crt", key="tls/server.key")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = engine_env(config, None)
    check = subprocess.run([*HL7ENGINE, "check", "--config", str(config)], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check  # the checker finds the files ...
    log_path = config / "engine.log"
    with open(log_path, "wb") as log:  # ... so the engine, started from another directory, should too
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=elsewhere)
    eng = RunningEngine(config, port, env, proc, log_path)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and "engine started" not in eng.log():
            time.sleep(0.05)
        assert "engine started" in eng.log(), eng.log()
        eng.writer_pids = children_of(proc.pid)
        ctrl = uid("REL")
        assert_accepted(tls_send(eng, client_context(pki), ctrl), ctrl)
    finally:
        eng.stop(signal.SIGTERM)


def test_tls_files_must_exist_for_the_engine_to_start(tmp_path: Path, pki: PKI) -> None:
    port = free_port()
    tls_channel(tmp_path, port, pki, cert=str(tmp_path / "nope.crt"))
    result = subprocess.run([*HL7ENGINE, "run", "--config", str(tmp_path)], cwd=tmp_path,
                            env=engine_env(tmp_path, None), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "listen.tls.cert_file" in result.stderr and "nope.crt" in result.stderr
    assert "nothing started" in result.stderr


def test_make_pki_with_openssl_when_cryptography_is_missing(tmp_path: Path) -> None:
    """The fallback used on machines without ``cryptography`` makes a PKI that verifies both ways."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    p = _make_pki_openssl(tmp_path)
    srv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    srv_ctx.load_cert_chain(str(p.server_cert), str(p.server_key))
    srv_ctx.verify_mode = ssl.CERT_REQUIRED
    srv_ctx.load_verify_locations(str(p.ca))
    cli_ctx = ssl.create_default_context(cafile=str(p.ca))
    cli_ctx.load_cert_chain(str(p.client_cert), str(p.client_key))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    peer: dict[str, object] = {}

    def serve() -> None:
        with srv_ctx.wrap_socket(a, server_side=True) as tls:
            peer.update(tls.getpeercert() or {})
            tls.sendall(tls.recv(16))

    t = threading.Thread(target=serve)
    t.start()
    with cli_ctx.wrap_socket(b, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"ping")
        assert tls.recv(16) == b"ping"
    t.join(10)
    assert peer.get("subject") == ((("commonName", "lis-sender"),),)
