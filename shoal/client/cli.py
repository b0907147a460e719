"""``shoal infer``: send files to a model from the command line, one JSON result per file."""

from __future__ import annotations

import argparse
import os

HELP = (
    "Send images, camera frames or .npy tensors to a model (through central, or to one gateway), or run "
    "them on a local model, and print the results."
)
EXAMPLE = """
SHOAL_DEVICE_PASSWORD=pw shoal infer --central http://127.0.0.1:7000 --device cam-1 --model mnist-cnn digit.png
shoal infer --url http://127.0.0.1:8000 --token devkey --model mnist-cnn digit.png other.png
shoal infer --local models/mnist-mlp/1 digit.png                       # on this device only
SHOAL_DEVICE_PASSWORD=pw shoal infer --central http://127.0.0.1:7000 --device cam-1 --model mnist-cnn \\
    --local models/mnist-mlp/1 --policy cascade --threshold 0.99 --frame-format jpeg frame.npy
"""
POLICIES = ("local", "remote", "fastest", "cascade", "split")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        help="PNG/JPEG images (sent as they are) or .npy arrays (sent as the model's input)",
    )
    p.add_argument("--model", default=None, help="the cluster's model (needed unless --policy local)")
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
    e = p.add_argument_group("on the device (pip install 'shoal[edge]'; docs/edge.md)")
    e.add_argument("--local", metavar="MODEL_DIR", help="a model repository version folder to run here")
    e.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="where each file runs: local, remote, fastest, cascade or split "
        "(default: local with --local alone, remote otherwise)",
    )
    e.add_argument(
        "--threshold", type=float, default=0.9, help="cascade: keep the local answer at this top-class probability"
    )
    e.add_argument("--budget-ms", type=float, default=None, help="latency budget of each request, in ms")
    e.add_argument(
        "--frame-format",
        choices=("jpeg", "png"),
        default=None,
        help=".npy files are raw camera frames (uint8 [H, W] or [H, W, 3]) sent encoded as this",
    )
    e.add_argument("--quality", type=int, default=90, help="JPEG quality of frames, 1-95 (default: 90)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from shoal.client.device import Client, InferResult, RouteError
    from shoal.client.edge import Edge, EdgeError, run_offline
    from shoal.client.http import InferError, OipHttpClient
    from shoal.client.placement import PlacementError
    from shoal.modelrepo import ManifestError

    def load(path: Path) -> tuple[dict | None, bytes | None]:
        if path.suffix == ".npy":
            return {"__input__": np.load(path, allow_pickle=False)}, None
        return None, path.read_bytes()

    policy = args.policy or ("local" if args.local and not args.central else "remote")
    if args.local and args.url:
        print("shoal infer: --local routes through central (--central), not --url", file=sys.stderr)
        return 2
    if policy != "local" and not args.model:
        print(f"shoal infer: --policy {policy} needs --model (the cluster's model)", file=sys.stderr)
        return 2
    if policy != "remote" and not args.local:
        print(f"shoal infer: --policy {policy} needs --local MODEL_DIR", file=sys.stderr)
        return 2
    if args.frame_format and not 1 <= args.quality <= 95:
        print(f"shoal infer: --quality must be 1-95, not {args.quality}", file=sys.stderr)
        return 2
    edge = None
    if args.local and not args.central:
        if policy != "local":
            print(f"shoal infer: --policy {policy} needs --central (only local runs alone)", file=sys.stderr)
            return 2
        try:
            edge = Edge(None, args.local, "local")
        except (EdgeError, ManifestError, PlacementError) as e:
            print(f"shoal infer: {e}", file=sys.stderr)
            return 2

    rc = 0
    if edge is None and args.url:
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
    elif edge is None:
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
        try:
            client = Client(
                args.central,
                args.device,
                password,
                timeout=args.timeout,
                ca_file=args.ca,
                local=args.local,
                policy=policy,
                threshold=args.threshold,
            )
        except (EdgeError, ManifestError, PlacementError) as e:
            print(f"shoal infer: {e}", file=sys.stderr)
            return 2
        first_input = None
    for f in args.files:
        path = Path(f)
        try:
            inputs, image = load(path)
            frame = None
            if inputs is not None and args.frame_format:
                frame, inputs = inputs["__input__"], None
            if edge is not None:
                if inputs is not None:
                    if not args.input:
                        raise ValueError("give --input NAME for .npy tensors (or --frame-format for frames)")
                    inputs = {args.input: inputs["__input__"]}
                res = run_offline(edge.infer(args.model or "", inputs, image, frame, args.version))
            elif args.url:
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
                res = client.infer(
                    args.model,
                    inputs=inputs,
                    image=image,
                    version=args.version,
                    frame=frame,
                    budget_ms=args.budget_ms,
                    frame_format=args.frame_format or "jpeg",
                    quality=args.quality,
                )
            out = {"file": str(path), **res.to_json()}
            if not args.full:
                out.pop("outputs")
            print(json.dumps(out), flush=True)
        except (OSError, ValueError, InferError, RouteError) as e:  # EdgeError, PlacementError: ValueError
            print(json.dumps({"file": str(path), "error": str(e)}), flush=True)
            rc = 1
    return rc
