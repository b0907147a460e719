"""``shoal infer``: send files to a model from the command line, one JSON result per file."""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal, get_args

from shoal.config import Opt, Settings, add_settings

HELP = (
    "Send images, camera frames or .npy tensors to a model (through central, or to one gateway), or run "
    "them on a local model, and print the results."
)
EXAMPLE = """
SHOAL_DEVICE_PASSWORD=pw shoal infer --central http://127.0.0.1:7000 --device cam-1 --model mnist-cnn digit.png
shoal infer --url http://127.0.0.1:8000 --token devkey --model mnist-cnn digit.png other.png
shoal infer --url grpc://127.0.0.1:8001 --token devkey --model mnist-cnn digit.png   # the gRPC front
shoal infer --local models/mnist-mlp/1 digit.png                       # on this device only
SHOAL_DEVICE_PASSWORD=pw shoal infer --central http://127.0.0.1:7000 --device cam-1 --model mnist-cnn \\
    --local models/mnist-mlp/1 --policy cascade --threshold 0.99 --frame-format jpeg frame.npy
"""
Policy = Literal["local", "remote", "fastest", "cascade", "split"]
POLICIES = get_args(Policy)
ON_DEVICE = "on the device (pip install 'shoal[edge]'; docs/edge.md)"


class InferSettings(Settings, kw_only=True):
    """``shoal infer``: its flags, the keys of its --config file, its SHOAL_INFER_* variables."""

    COMMAND = "infer"

    model: Annotated[str | None, Opt("the cluster's model (needed unless --policy local)")] = None
    version: Annotated[str | None, Opt("the model's version (default: the newest served)")] = None
    central: Annotated[list[str], Opt("central URL (repeatable: replicas are tried in turn)")] = []
    device: Annotated[str, Opt("device account name (default: $SHOAL_DEVICE)", env=("SHOAL_DEVICE",))] = ""
    password: Annotated[
        str | None,
        Opt("device password (default: $SHOAL_DEVICE_PASSWORD)", secret=True, env=("SHOAL_DEVICE_PASSWORD",)),
    ] = None
    url: Annotated[
        str | None,
        Opt(
            "talk to this gateway directly instead of routing through central: http(s)://HOST:8000, or "
            "grpc(s)://HOST:8001 for its gRPC front (needs shoal[grpc])"
        ),
    ] = None
    token: Annotated[
        str | None, Opt("bearer token for --url (default: $SHOAL_TOKEN)", secret=True, env=("SHOAL_TOKEN",))
    ] = None
    input: Annotated[str | None, Opt("input name for .npy files (default: the model's first input)")] = None
    ca: Annotated[str | None, Opt("CA file to verify TLS certificates")] = None
    timeout: Annotated[float, Opt("seconds to wait for each answer (default %(default)s)")] = 10.0
    full: Annotated[bool, Opt("print every output value, not only the labels")] = False
    local: Annotated[
        str | None, Opt("a model repository version folder to run here", metavar="MODEL_DIR", group=ON_DEVICE)
    ] = None
    policy: Annotated[
        Policy | None,
        Opt(
            "where each file runs: local, remote, fastest, cascade or split "
            "(default: local with --local alone, remote otherwise)",
            group=ON_DEVICE,
        ),
    ] = None
    threshold: Annotated[
        float, Opt("cascade: keep the local answer at this top-class probability", group=ON_DEVICE)
    ] = 0.9
    budget_ms: Annotated[float | None, Opt("latency budget of each request, in ms", group=ON_DEVICE)] = None
    frame_format: Annotated[
        Literal["jpeg", "png"] | None,
        Opt(
            ".npy files are raw camera frames (uint8 [H, W] or [H, W, 3]) sent encoded as this",
            group=ON_DEVICE,
        ),
    ] = None
    quality: Annotated[int, Opt("JPEG quality of frames, 1-95 (default: 90)", group=ON_DEVICE)] = 90


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        help="PNG/JPEG images (sent as they are) or .npy arrays (sent as the model's input)",
    )
    add_settings(p, InferSettings)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import numpy as np

    from shoal.client.device import Client, RouteError
    from shoal.client.edge import Edge, EdgeError, encode_frame, run_offline
    from shoal.client.http import InferError, OipHttpClient
    from shoal.client.placement import PlacementError
    from shoal.modelrepo import ManifestError

    def load(path: Path) -> tuple[dict | None, bytes | None]:
        if path.suffix == ".npy":
            return {"__input__": np.load(path, allow_pickle=False)}, None
        return None, path.read_bytes()

    policy = args.policy or ("local" if args.local and not args.central else "remote")
    if args.ca and not Path(args.ca).is_file():
        print(f"shoal infer: --ca {args.ca}: no such file", file=sys.stderr)
        return 2
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
        token = args.token
        try:
            if args.url.startswith(("grpc://", "grpcs://")):
                direct = _grpc_client(args)
                code, meta = 200, direct.metadata(args.model, args.version)
            else:
                direct = OipHttpClient(args.url, token, timeout=args.timeout, ca_file=args.ca)
                code, meta = direct.get_json(
                    f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "")
                )
        except (OSError, ValueError, InferError) as e:  # unreachable, TLS refused, a bad CA file, not JSON
            print(f"shoal infer: {args.url}: {e}", file=sys.stderr)
            return 2
        if code != 200:
            print(
                f"shoal infer: {args.url}: HTTP {code}: {meta.get('error') if isinstance(meta, dict) else meta}",
                file=sys.stderr,
            )
            return 2
        first_input = meta["inputs"][0]["name"]
        # gRPC's metadata has no labels: the gRPC client learns them from the gateway (None).
        labels = (
            None
            if "parameters" not in meta and args.url.startswith("grpc")
            else ((meta.get("parameters") or {}).get("labels") or {})
        )
    elif edge is None:
        if not args.central:
            print("shoal infer: give --central URL (or --url for one gateway)", file=sys.stderr)
            return 2
        password = args.password or ""
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
                if frame is not None:  # encoded here, as the routed client does
                    image = encode_frame(frame, args.frame_format, args.quality)
                if inputs is not None:
                    inputs = {name: inputs["__input__"]}
                res = direct.infer_result(args.model, inputs, image, args.version, labels)
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


def _grpc_client(args: argparse.Namespace) -> Any:
    """The gateway's gRPC front, for ``--url grpc://...``: ``ValueError`` when grpcio is missing."""
    try:
        from shoal.client.grpc_client import OipGrpcClient
    except ImportError:
        raise ValueError("a grpc:// address needs shoal[grpc] (pip install 'shoal[grpc]')") from None
    return OipGrpcClient(args.url, args.token, timeout=args.timeout, ca_file=args.ca)
