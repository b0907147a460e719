"""``shoal models``: list, load and unload models on a gateway (its repository API; operator key)."""

from __future__ import annotations

import argparse
import sys
from typing import Annotated

from shoal.config import Opt, Settings, add_settings

HELP = "List, load and unload a gateway's models (Triton's repository API; operator credentials)."
EXAMPLE = """
SHOAL_TOKEN=opkey shoal models list --url http://127.0.0.1:8000
SHOAL_TOKEN=opkey shoal models load mnist-cnn --url http://127.0.0.1:8000     # answers once a worker is ready
SHOAL_TOKEN=opkey shoal models unload mnist-cnn --url http://127.0.0.1:8000   # its workers drain and leave
"""


class ModelsSettings(Settings, kw_only=True):
    """``shoal models``: its flags, the keys of its --config file, its SHOAL_MODELS_* variables."""

    COMMAND = "models"

    url: Annotated[str, Opt("the gateway (default %(default)s)")] = "http://127.0.0.1:8000"
    token: Annotated[
        str | None, Opt("an operator key (default: $SHOAL_TOKEN)", secret=True, env=("SHOAL_TOKEN",))
    ] = None
    ca: Annotated[str | None, Opt("CA file to verify the gateway's certificate")] = None
    timeout: Annotated[float, Opt("seconds to wait (default %(default)s)")] = 120.0
    json: Annotated[bool, Opt("print the answer as JSON")] = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "load", "unload"))
    p.add_argument("model", nargs="?", help="the model to load or unload")
    add_settings(p, ModelsSettings)


def run(args: argparse.Namespace) -> int:
    import json
    from urllib.parse import quote

    from shoal.client.http import OipHttpClient

    if args.action != "list" and not args.model:
        print(f"shoal models {args.action}: name the model", file=sys.stderr)
        return 2
    token = args.token
    path = "/v2/repository/index" if args.action == "list" else (
        f"/v2/repository/models/{quote(args.model, safe='')}/{args.action}"
    )
    try:
        with OipHttpClient(args.url, token, timeout=args.timeout, ca_file=args.ca) as c:
            status, _, body = c.request("POST", path, b"{}", {"Content-Type": "application/json"})
    except OSError as e:
        print(f"shoal models: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {"error": body[:200].decode("utf-8", "replace")}
    if status != 200:
        print(f"shoal models {args.action}: HTTP {status}: {doc.get('error', doc) if isinstance(doc, dict) else doc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc))
    elif args.action == "list":
        for r in doc:
            print(f"{r['name']:<28} {r['version']:<8} {r['state']:<12} {r.get('reason', '')}")
    else:
        print(f"{args.action}ed {args.model}")
    return 0
