"""The messages of central's HTTP API, each declared once as a typed structure (msgspec).

Central decodes request bodies into these and encodes its answers from them; the gateway builds its
report to central from ``Report`` and ``ModelLoad``; the device client reads ``RouteAnswer``; central's
OpenAPI document is generated from them (``shoal/central/openapi.py``). Decoding validates types and
limits and names the field on error (``Expected `float` >= 0.0 - at `$.models[0].capacity```).
Unknown fields are ignored, so a newer peer may send more.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from shoal.protocol.names import PATTERN as MODEL_NAME_PATTERN
from shoal.protocol.names import RULE as MODEL_NAME_RULE

ACCOUNT_KINDS = ("device", "cluster", "operator")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
MAX_MODELS_PER_REPORT = 1000
MAX_EXCLUDED = 100

AccountKind = Literal["device", "cluster", "operator"]
Name = Annotated[
    str,
    msgspec.Meta(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '@', '-'; up to 128"),
]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# A model name or version: the one rule of shoal/protocol/names.py.
ModelName = Annotated[str, msgspec.Meta(pattern=MODEL_NAME_PATTERN, max_length=128, description=MODEL_NAME_RULE)]
Amount = Annotated[float, msgspec.Meta(ge=0)]  # JSON has no NaN, and 1e999 is refused as out of range
Count = Annotated[int, msgspec.Meta(ge=0)]
CommandId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # a 64-bit database id
Url = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=2048, pattern=r"^https?://[^/?#\s]+", examples=["http://127.0.0.1:8000"]
    ),
]


class Error(msgspec.Struct, frozen=True):
    """Every error answer."""

    error: Annotated[str, msgspec.Meta(description="what is wrong, in words")]


class Health(msgspec.Struct, frozen=True):
    ok: bool
    replica: str


# ------------------------------------------------------------------------------------- clusters


class ModelLoad(msgspec.Struct, frozen=True):
    """One model version a cluster serves, and its load, as the cluster reports it."""

    name: ModelName
    version: ModelName
    ready: bool = True
    in_flight: Amount = 0.0
    capacity: Amount = 1.0
    queue: Amount = 0.0
    latency_ms: Amount = 0.0
    workers: Count = 0
    asleep: Annotated[
        bool, msgspec.Meta(description="no worker now; the cluster starts one for the first request")
    ] = False


class Report(msgspec.Struct, frozen=True):
    """A cluster's report, sent every ``report_interval_s`` to every central replica."""

    address: Annotated[Url, msgspec.Meta(description="where devices reach the cluster")]
    models: Annotated[list[ModelLoad], msgspec.Meta(max_length=MAX_MODELS_PER_REPORT)]

    def __post_init__(self) -> None:
        if not urlsplit(self.address).hostname:
            raise ValueError(f"`$.address` must be an http:// or https:// URL with a host, not {self.address!r}")


class ReportAnswer(msgspec.Struct, frozen=True):
    ok: bool
    cluster: str
    token_key: Annotated[
        str, msgspec.Meta(description="base64url (padded) of the 32-byte key this cluster verifies route tokens with")
    ]
    report_interval_s: float


class ModelView(ModelLoad, frozen=True, kw_only=True):
    load: float | None = None  # (in_flight + queue) / capacity; None where capacity is 0


class ClusterView(msgspec.Struct, frozen=True):
    name: str
    address: str
    live: bool
    last_report_s: float
    load: float | None
    models: list[ModelView]


class ClusterList(msgspec.Struct, frozen=True):
    clusters: list[ClusterView]
    report_interval_s: float


# --------------------------------------------------------------------------------------- routes


class RouteRequest(msgspec.Struct, frozen=True):
    model: ModelName
    version: ModelName | None = None
    exclude: Annotated[
        list[Text], msgspec.Meta(max_length=MAX_EXCLUDED, description="clusters to avoid (they just failed)")
    ] = []


class RouteAnswer(msgspec.Struct, frozen=True):
    cluster: str
    url: str
    token: Annotated[str, msgspec.Meta(description="route token: Authorization: Bearer at the cluster")]
    expires_at: Annotated[int, msgspec.Meta(description="unix seconds")]
    model: str
    version: str
    latency_ms: Annotated[
        float, msgspec.Meta(description="the cluster's recent compute latency for the model (its last report)")
    ] = 0.0


class Session(msgspec.Struct, frozen=True):
    token: str
    expires_in: int
    kind: Literal["device"]


# ------------------------------------------------------------------------------------- accounts


class NewAccount(msgspec.Struct, frozen=True):
    kind: AccountKind
    name: Name
    password: Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]


class AccountAdded(msgspec.Struct, frozen=True):
    kind: str
    name: str


class Account(msgspec.Struct, frozen=True):
    kind: str
    name: str
    created_at: float


class AccountList(msgspec.Struct, frozen=True):
    accounts: list[Account]


class AccountRemoved(msgspec.Struct, frozen=True):
    removed: bool
    kind: str
    name: str


# ------------------------------------------------------------------------------------- commands


class NewCommand(msgspec.Struct, frozen=True):
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    args: dict[str, Any] = {}


class CommandAdded(msgspec.Struct, frozen=True):
    id: int
    device: str
    command: str


class Command(msgspec.Struct, frozen=True):
    id: int
    command: str
    args: dict[str, Any]
    created_at: float
    created_by: str


class CommandList(msgspec.Struct, frozen=True):
    commands: list[Command]


class Ack(msgspec.Struct, frozen=True):
    result: Any = None


class AckAnswer(msgspec.Struct, frozen=True):
    ok: bool
    id: int


class AckedCommand(msgspec.Struct, frozen=True):
    id: int
    device: str
    command: str
    acked_at: float
    result: Any = None


# --------------------------------------------------------------------------------------- status


class ReplicaInfo(msgspec.Struct, frozen=True):
    replica: str
    version: str
    uptime_s: float
    database: str
    report_interval_s: float


class DeviceSeen(msgspec.Struct, frozen=True):
    name: str
    last_seen_s: float


class RouteCounts(msgspec.Struct, frozen=True):
    answered: int
    unserved: int


class CommandCounts(msgspec.Struct, frozen=True):
    pending: int
    acked: int


class WebhookState(msgspec.Struct, frozen=True):
    url_set: bool
    sent: int
    failed: int
    skipped: int
    last_error: str | None
    last_ok_at: float | None


class Status(msgspec.Struct, frozen=True):
    central: ReplicaInfo
    clusters: list[ClusterView]
    devices: list[DeviceSeen]
    devices_live: int
    routes: RouteCounts
    reports: int
    auth_failures: int
    auth_throttled: int
    commands: CommandCounts
    webhook: WebhookState


class WebhookPost(msgspec.Struct, frozen=True):
    """What central POSTs to ``--webhook`` every interval."""

    event: Literal["status"]
    central: str
    time: float
    clusters: list[ClusterView]
    devices_live: int
    commands_acked: list[AckedCommand]
