"""The device side of shoal: ``Client`` / ``AsyncClient`` (route through central, talk to the cluster,
fail over), and ``OipHttpClient`` for talking to one gateway directly."""

from shoal.client.device import AsyncClient, Client, InferError, InferResult, Route, RouteError
from shoal.client.edge import LocalModel, encode_frame
from shoal.client.http import OipHttpClient

__all__ = [
    "AsyncClient",
    "Client",
    "InferError",
    "InferResult",
    "LocalModel",
    "OipHttpClient",
    "Route",
    "RouteError",
    "encode_frame",
]
