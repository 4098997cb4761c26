"""A real Flower 1.42 deployment of fedct: TLS, authenticated SuperNodes, ``flwr run``.

Helpers for the coordinating centre and for the hospitals (and for the loopback test):

- :func:`make_tls`: a CA and a server certificate for the SuperLink (subjectAltName
  ``DNS:localhost, IP:127.0.0.1, IP:::1`` by default, plus the hosts you name);
- :func:`make_node_key`: a SuperNode's key pair, ECDSA P-384 in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384 -N ""`` writes);
- :func:`write_connection`: a ``[superlink.NAME]`` table in ``$FLWR_HOME/config.toml``,
  where the ``flwr`` CLI looks up a connection (address and CA);
- :class:`Deployment`: starts ``flower-superlink`` (on 127.0.0.1 only), the Fleet gateway
  that the hospitals reach (:mod:`fedct.federation.gateway`) and ``flower-supernode`` as
  subprocesses, runs ``flwr supernode register`` and ``flwr run``, and stops everything it
  started by PID when its ``with`` block ends.

Private keys are written with mode 0600 (replacing any looser file) and a process is not
started with a key that a group or others may read.

Every process of a :class:`Deployment` gets ``FLWR_HOME`` in a folder of ours (one per
process, as on separate machines), the venv's ``bin`` first on ``PATH`` (Flower starts
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), telemetry off,
and a marker variable naming the deployment. The SuperLink starts ``flower-superexec`` in a
session of its own, so stopping process groups is not enough: :meth:`Deployment.stop` also
kills, by PID, every process that carries the marker. Facts measured with Flower 1.42 are in
``/work/shared/FEDERATION.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fedct import procs
from fedct.errors import FedctError
from fedct.federation.gateway import check_private_key, join_address

#: The Flower App bundle that ``flwr run`` submits (pyproject.toml and README.md only).
APP_DIR = Path(__file__).resolve().parent / "app"
MARKER = "FEDCT_DEPLOYMENT"  # environment variable naming the deployment of a process
# A SuperNode that the SuperLink refuses logs Flower's "Exit Code: 305" ("Failed to activate
# SuperNode" for an unregistered key, CERTIFICATE_VERIFY_FAILED without the CA); the process
# itself exits with status 1 (Flower 1.42 maps every error code to 1).
REFUSED_CODE = 305
STOP_GRACE_S = 5.0
LOOPBACK = "127.0.0.1"  # where the SuperLink's own port listens


# --------------------------------------------------------------------------- credentials


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA certificate (for nodes and CLI), the SuperLink's certificate, key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A submitted run: Flower's run id, final status (``finished:completed``), its reason
    when it failed, and what ``flwr run --stream`` printed (the ServerApp's log)."""

    run_id: int
    status: str
    details: str
    output: str


@dataclasses.dataclass(frozen=True)
class SuperLink:
    """A started SuperLink: its process (all APIs, on loopback) and its Fleet gateway; the
    address the centre's ``flwr`` dials and the address the hospitals' SuperNodes dial."""

    superlink: subprocess.Popen
    gateway: subprocess.Popen
    control_address: str
    fleet_address: str


@dataclasses.dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair: private key (stays at the hospital), public key (registered)."""

    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key with mode 0600: a new file (created 0600) replaces ``path``.

    Replacing, not rewriting, also tightens an existing looser file (its old mode would
    survive ``O_TRUNC``), and a process that opened the old file cannot read the new key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_tls(out_dir: Path, hosts: Sequence[str] = (), days: int = 365,
             common_name: str = "fedct SuperLink") -> TlsFiles:
    """A CA (``ca.crt``, ``ca.key``) and a server certificate it signs (``server.pem``,
    ``server.key``), all ECDSA P-384, in ``out_dir``.

    The server certificate names ``localhost``, ``127.0.0.1`` and ``::1`` and every entry of
    ``hosts`` (DNS names or IP addresses: the SuperLink's address as the nodes dial it).
    Keys are written with mode 0600. Equivalent to the ``openssl`` commands in the README.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedct"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(name("fedct federation CA"))
          .issuer_name(name("fedct federation CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA384()))

    alt: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.IPAddress(ipaddress.ip_address("::1"))]
    for host in hosts:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in alt:
            alt.append(entry)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name(common_name))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    files = TlsFiles(out_dir / "ca.crt", out_dir / "server.pem", out_dir / "server.key")
    _write_private(out_dir / "ca.key", ca_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files.ca_cert.write_bytes(ca.public_bytes(pem))
    files.server_cert.write_bytes(cert.public_bytes(pem))
    _write_private(files.server_key, key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def make_node_key(out_dir: Path, name: str) -> NodeKey:
    """``out_dir/name`` (private) and ``out_dir/name.pub``: ECDSA P-384, OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(Path(out_dir) / name, Path(out_dir) / f"{name}.pub")
    _write_private(pair.private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    pair.public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return pair


def write_connection(flwr_home: Path, name: str, address: str,
                     root_certificates: Path | None) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``flwr_home/config.toml``; its path.

    ``address`` is the SuperLink's ``host:port``; ``root_certificates`` the CA that signed
    its certificate (``None``: an insecure connection, for local experiments only).
    """
    import tomli
    import tomli_w

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        config = tomli.loads(path.read_text()) if path.exists() else {}
    except tomli.TOMLDecodeError as exc:
        raise FedctError(f"{path}: not a valid Flower configuration ({exc})") from exc
    table: dict[str, Any] = {"address": address}
    if root_certificates is None:
        table["insecure"] = True
    else:
        table["root-certificates"] = str(Path(root_certificates).resolve())
    links = config.setdefault("superlink", {})
    links[name] = table
    links.setdefault("default", name)
    path.write_text(tomli_w.dumps(config))
    return path


def node_config_arg(config: Mapping[str, Any]) -> str:
    """``--node-config`` text: ``site='A' cohort-dir='/data'`` (TOML literal strings)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if "'" in text or any(c.isspace() for c in text):
                raise FedctError(f"node config {key}={text!r}: quotes and blanks are not "
                                 "allowed (Flower splits the option on blanks)")
            parts.append(f"{key}='{text}'")
    return " ".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float,
                  proc: subprocess.Popen | None = None) -> float:
    """Wait until ``host:port`` accepts connections; the seconds waited.

    Fails early when ``proc`` (the server that should listen there) has exited.
    """
    t0 = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return time.monotonic() - t0
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise FedctError(f"{proc.args[0]} exited with code {proc.returncode} before "
                             f"listening on {host}:{port}")
        if time.monotonic() - t0 > timeout:
            raise FedctError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------- processes


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _tool(name: str) -> str:
    path = _bin_dir() / name
    if not path.exists():
        raise FedctError(f"{path}: Flower's {name} is not installed beside this Python")
    return str(path)


class Deployment:
    """Flower processes started under ``root`` and stopped, by PID, when the block ends.

    ``root`` holds one ``FLWR_HOME`` per process (``home/<name>``), their logs
    (``logs/<name>.log``) and the ``flwr`` CLI's home (``home/cli``, with its
    ``config.toml``). Long-running processes are kept by name; :meth:`stop` ends them
    (SIGTERM to the process group, SIGKILL after a grace) and then every other process
    that carries this deployment's marker (the SuperLink's SuperExec lives in a session
    of its own).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.id = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO[bytes]] = {}

    # -- paths and environment

    def home(self, name: str) -> Path:
        return self.root / "home" / name

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @property
    def cli_home(self) -> Path:
        return self.home("cli")

    def env(self, name: str) -> dict[str, str]:
        home = self.home(name)
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLWR_HOME": str(home), MARKER: self.id,
                "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- long-running processes

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None
              ) -> subprocess.Popen:
        """Start ``argv`` as ``name`` in a new session, output to ``logs/<name>.log``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise FedctError(f"deployment: {name} is already running")
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - closed in stop()
        self._logs[name] = log
        work = Path(cwd) if cwd else self.home(name)
        work.mkdir(parents=True, exist_ok=True)
        proc = procs.start_group(argv, env=self.env(name), cwd=work, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def start_superlink(self, tls: TlsFiles, fleet_port: int, control_port: int,
                        fleet_host: str = "127.0.0.1", name: str = "superlink",
                        cwd: Path | None = None, timeout: float = 60.0) -> SuperLink:
        """``flower-superlink`` on loopback and the Fleet gateway for the hospitals.

        The SuperLink (TLS, SuperNode authentication) listens on ``127.0.0.1:control_port``
        only: its one port serves the Control API (``flwr``), the Runtime API and the Fleet
        API. The gateway (:mod:`fedct.federation.gateway`, process ``NAME-gateway``) listens
        on ``fleet_host:fleet_port`` and forwards the Fleet API alone. Apps run with what is
        installed (``--disable-runtime-dependency-installation``). ``cwd`` is where the
        ServerApp resolves relative paths of its run config. Waits until both listen.
        """
        check_private_key(tls.server_key)
        link = self.start(name, [
            _tool("flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", LOOPBACK, "--port", str(control_port)], cwd=cwd)
        control = join_address(LOOPBACK, control_port)
        gateway = self.start(f"{name}-gateway", [
            sys.executable, "-m", "fedct.federation.gateway",
            "--listen", join_address(fleet_host, fleet_port), "--superlink", control,
            "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key)])
        wait_for_port(LOOPBACK, control_port, timeout, link)
        wait_for_port(fleet_host, fleet_port, timeout, gateway)
        return SuperLink(link, gateway, control, join_address(fleet_host, fleet_port))

    def start_supernode(self, name: str, superlink: str, ca_cert: Path | None,
                        private_key: Path, node_config: Mapping[str, Any], port: int,
                        host: str = "127.0.0.1") -> subprocess.Popen:
        """``flower-supernode`` dialling ``superlink`` (``host:port``) over TLS.

        ``ca_cert`` verifies the SuperLink's certificate (``None``: the system's roots
        only, which refuse a private CA); ``private_key`` (mode 0600) authenticates the node;
        ``node_config`` names its site and data (``{"site": "A", "cohort-dir":
        "/data/fedct/cohort"}``); ``host:port`` serves its local runtime API (one port per
        node on a host). Does not wait: a refused node exits on its own.
        """
        check_private_key(private_key)
        ca = ["--root-certificates", str(ca_cert)] if ca_cert is not None else []
        return self.start(name, [
            _tool("flower-supernode"), "--superlink", superlink, *ca,
            "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config_arg(node_config), "--host", host, "--port", str(port)])

    # -- short commands of the flwr CLI

    def flwr(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        """``flwr ARGS`` with the CLI's home; output captured (also in ``logs/flwr.log``).

        Runs in its own session; on timeout its process group is killed and the call fails.
        """
        proc = procs.start_group([_tool("flwr"), *args], env=self.env("cli"),
                                 cwd=self.cli_home, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[f"flwr-{proc.pid}"] = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs.stop_group(proc, STOP_GRACE_S)
            out, _ = proc.communicate()
            self._append_cli_log(args, out)
            raise FedctError(f"flwr {' '.join(args[:2])} did not finish within "
                             f"{timeout:.0f} s; see {self.log_path('flwr')}") from None
        finally:
            self.procs.pop(f"flwr-{proc.pid}", None)
        self._append_cli_log(args, out)
        return subprocess.CompletedProcess(proc.args, proc.returncode,
                                           out.decode(errors="replace"))

    def _append_cli_log(self, args: Sequence[str], out: bytes) -> None:
        path = self.log_path("flwr")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(f"$ flwr {' '.join(args)}\n".encode() + out)

    def add_connection(self, name: str, address: str, ca_cert: Path | None) -> Path:
        """A ``[superlink.NAME]`` connection in the CLI's ``config.toml``."""
        return write_connection(self.cli_home, name, address, ca_cert)

    def register(self, public_key: Path, connection: str, name: str,
                 timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``flwr supernode register PUBLIC_KEY CONNECTION --name NAME``; fails unless 0."""
        done = self.flwr(["supernode", "register", str(public_key), connection,
                          "--name", name], timeout)
        if done.returncode != 0:
            raise FedctError(f"registering {public_key} failed (exit {done.returncode}): "
                             f"{_last_line(_plain(done.stdout))}")
        return done

    def run_app(self, connection: str, run_config: Mapping[str, Any] | None = None,
                app_dir: Path = APP_DIR, timeout: float = 600.0, check: bool = True
                ) -> RunResult:
        """``flwr run APP_DIR CONNECTION --run-config FILE --stream``: submit, follow, check.

        ``run_config`` overrides defaults of the app's ``[tool.flwr.app.config]`` (every key
        must exist there); it travels as a TOML file, so JSON values need no shell quoting.
        ``flwr run --stream`` exits 0 even when the ServerApp fails, so the run's final
        status is read back with ``flwr ls``; with ``check``, anything but
        ``finished:completed`` raises :class:`FedctError` with Flower's reason.
        """
        import tomli_w

        args = ["run", str(Path(app_dir).resolve()), connection, "--stream"]
        if run_config:
            path = self.cli_home / f"run-config-{uuid.uuid4().hex[:8]}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tomli_w.dumps(dict(run_config)))
            args += ["--run-config", str(path)]
        done = self.flwr(args, timeout)
        started = re.search(r"Successfully started run (\d+)", done.stdout)
        if started is None:
            raise FedctError(f"flwr run was refused (exit {done.returncode}): "
                             f"{_last_line(_plain(done.stdout))}")
        run_id = int(started.group(1))
        status, details = self.run_status(connection, run_id)
        result = RunResult(run_id, status, details, done.stdout)
        if check and status != "finished:completed":
            raise FedctError(f"federation run {run_id} ended {status}: {details}; "
                             f"see {self.log_path('flwr')}")
        return result

    def run_status(self, connection: str, run_id: int) -> tuple[str, str]:
        """``(status, status-details)`` of a run, from ``flwr ls --run-id``."""
        done = self.flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], 60)
        try:
            reply = json.loads(done.stdout[done.stdout.index("{"):])
            run = next(r for r in reply["runs"] if int(r["run-id"]) == run_id)
        except (ValueError, KeyError, StopIteration) as exc:
            raise FedctError(f"flwr ls: no status for run {run_id}: "
                             f"{_last_line(_plain(done.stdout))}") from exc
        return str(run["status"]), str(run.get("status-details", ""))

    # -- stopping

    def stop(self, name: str | None = None) -> None:
        """Stop ``name`` (or everything, then every process with this deployment's marker)."""
        names = [name] if name else list(self.procs)
        for n in names:
            proc = self.procs.pop(n, None)
            if proc is not None:
                procs.stop_group(proc, STOP_GRACE_S)
            log = self._logs.pop(n, None)
            if log is not None:
                log.close()
        if name is None:
            procs.stop_processes(procs.marked(MARKER, self.id), STOP_GRACE_S)
            left = self.leftovers()
            if left:
                raise FedctError(f"deployment: processes {left} would not stop")

    def leftovers(self) -> list[int]:
        """PIDs of live processes (not zombies) that carry this deployment's marker."""
        return [p.pid for p in procs.marked(MARKER, self.id)]

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
