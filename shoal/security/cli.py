"""``shoal certs``: a private CA and certificates for TLS on every link."""

from __future__ import annotations

import argparse
import sys

HELP = "Make a private certificate authority and certificates for TLS on every shoal link."
EXAMPLE = """
shoal certs --out pki --name gateway --host gw.example.org --host 10.0.0.5
shoal cluster --tls-cert pki/gateway.pem --tls-key pki/gateway.key ...
shoal worker --tls-ca pki/ca.pem ...
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for ca.pem/ca.key and the certificates")
    p.add_argument("--name", default="server", help="certificate file name (default %(default)s)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP address the certificate is for (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("cryptography") is None:
        print("shoal certs: needs the cryptography package: pip install 'shoal[tls]'", file=sys.stderr)
        return 2
    from shoal.security.certs import make_ca, make_cert

    out = Path(args.out)
    if not (out / "ca.pem").exists():
        ca, _ = make_ca(out)
        print(f"created CA {ca} (keep ca.key private)")
    if args.host:
        cert, key = make_cert(out, args.name, args.host, out)
        print(f"created {cert} and {key} for {', '.join(args.host)}")
    return 0
