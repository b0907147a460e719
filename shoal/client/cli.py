"""``shoal infer``: send files to a model from the command line, one JSON result per file."""

from __future__ import annotations

import argparse
import os

HELP = "Send images or .npy tensors to a model (through central, or to one gateway) and print the results."
EXAMPLE = """
SHOAL_DEVICE_PASSWORD=pw shoal infer --central http://127.0.0.1:7000 --device cam-1 --model mnist-cnn digit.png
shoal infer --url http://127.0.0.1:8000 --token devkey --model mnist-cnn digit.png other.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        help="PNG/JPEG images (sent as they are) or .npy arrays (sent as the model's input)",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--version", default=None)
    p.add_argument(
        "--central", action="append", default=[], help="central URL (repeatable: replicas are tried in turn)"
    )
    p.add_argument(
        "--device",
        default=os.environ.get("SHOAL_DEVICE", ""),
        help="device account name (default: $SHOAL_DEVICE)",
    )
    p.add_argument("--password", default=None, help="device password (default: $SHOAL_DEVICE_PASSWORD)")
    p.add_argument(
        "--url", default=None, help="talk to this gateway directly instead of routing through central"
    )
    p.add_argument("--token", default=None, help="bearer token for --url (default: $SHOAL_TOKEN)")
    p.add_argument(
        "--input", default=None, help="input name for .npy files (default: the model's first input)"
    )
    p.add_argument("--ca", default=None, help="CA file to verify TLS certificates")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--full", action="store_true", help="print every output value, not only the labels")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from shoal.client.device import Client, InferResult, RouteError
    from shoal.client.http import InferError, OipHttpClient

    def load(path: Path) -> tuple[dict | None, bytes | None]:
        if path.suffix == ".npy":
            return {"__input__": np.load(path, allow_pickle=False)}, None
        return None, path.read_bytes()

    rc = 0
    if args.url:
        token = args.token or os.environ.get("SHOAL_TOKEN")
        direct = OipHttpClient(args.url, token, timeout=args.timeout, ca_file=args.ca)
        code, meta = direct.get_json(
            f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "")
        )
        if code != 200:
            print(
                f"shoal infer: {args.url}: HTTP {code}: {meta.get('error') if isinstance(meta, dict) else meta}",
                file=sys.stderr,
            )
            return 2
        first_input = meta["inputs"][0]["name"]
        labels = (meta.get("parameters") or {}).get("labels") or {}
    else:
        if not args.central:
            print("shoal infer: give --central URL (or --url for one gateway)", file=sys.stderr)
            return 2
        password = args.password or os.environ.get("SHOAL_DEVICE_PASSWORD", "")
        if not args.device or not password:
            print(
                "shoal infer: --central needs --device and a password (--password or $SHOAL_DEVICE_PASSWORD)",
                file=sys.stderr,
            )
            return 2
        client = Client(args.central, args.device, password, timeout=args.timeout, ca_file=args.ca)
        first_input = None
    for f in args.files:
        path = Path(f)
        try:
            inputs, image = load(path)
            if args.url:
                name = args.input or first_input
                if inputs is not None:
                    inputs = {name: inputs["__input__"]}
                t0 = time.perf_counter()
                if image is not None:
                    outs = direct.infer_raw(args.model, image, args.version)
                else:
                    outs = direct.infer(args.model, inputs, args.version)
                res = InferResult(
                    outs, args.model, args.version or "", args.url, (time.perf_counter() - t0) * 1000, labels
                )
            else:
                if inputs is not None:
                    if not args.input:
                        raise ValueError("give --input NAME for .npy files when routing through central")
                    inputs = {args.input: inputs["__input__"]}
                res = client.infer(args.model, inputs=inputs, image=image, version=args.version)
            out = {"file": str(path), **res.to_json()}
            if not args.full:
                out.pop("outputs")
            print(json.dumps(out), flush=True)
        except (OSError, ValueError, InferError, RouteError) as e:
            print(json.dumps({"file": str(path), "error": str(e)}), flush=True)
            rc = 1
    return rc
