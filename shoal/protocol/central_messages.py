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
MAX_GATEWAYS_PER_CLUSTER = 64  # live gateways central keeps per cluster (more are refused, 409)

AccountKind = Literal["device", "cluster", "operator"]


def a_kind(kind: str) -> str:
    """The kind with its article, for messages: "a device", "an operator"."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"

Name = Annotated[
    str,
    msgspec.Meta(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '@', '-'; up to 128"),
]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# A gateway's id within its cluster: the account name rule, ':' allowed too (host:port makes a good
# id); "" is an older gateway that sends none (a cluster of one).
GatewayId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._@:-]{0,127})?$",
        description="letters, digits, '.', '_', '@', ':', '-'; up to 128; '' for a cluster of one gateway",
    ),
]
# A model name or version: the one rule of shoal/protocol/names.py.
ModelName = Annotated[
    str, msgspec.Meta(pattern=MODEL_NAME_PATTERN, max_length=128, description=MODEL_NAME_RULE)
]
Amount = Annotated[float, msgspec.Meta(ge=0)]  # JSON has no NaN, and 1e999 is refused as out of range
Count = Annotated[int, msgspec.Meta(ge=0)]
CommandId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # a 64-bit database id
# A W3C Trace Context ``traceparent`` (version 00): trace id, parent span id, flags.
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
Traceparent = Annotated[
    str,
    msgspec.Meta(
        pattern=TRACEPARENT_PATTERN,
        description="W3C traceparent of central's span of this route (only when central traces it)",
        examples=["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
    ),
]
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


class Operation(msgspec.Struct, frozen=True):
    """An operator's load or unload of a model at one gateway, which every gateway of the cluster
    applies (the newest per model wins)."""

    model: ModelName
    action: Literal["load", "unload"]
    at: Annotated[float, msgspec.Meta(ge=0, description="unix seconds, the gateway's clock")]


class Report(msgspec.Struct, frozen=True):
    """A gateway's report, sent every ``report_interval_s`` to every central replica. A cluster is
    served by one or more gateways, all logging in with the cluster's account, each with its own
    ``gateway`` id; older gateways send none (a cluster of one)."""

    address: Annotated[Url, msgspec.Meta(description="where devices reach this gateway")]
    models: Annotated[list[ModelLoad], msgspec.Meta(max_length=MAX_MODELS_PER_REPORT)]
    gateway: GatewayId = ""
    workers: Annotated[
        str,
        msgspec.Meta(max_length=256, description="host:port workers dial this gateway at ('' if not said)"),
    ] = ""
    decide: Annotated[
        bool,
        msgspec.Meta(description="this gateway runs an autoscaler and asks for the cluster's decision lease"),
    ] = False
    ops: Annotated[
        list[Operation],
        msgspec.Meta(max_length=MAX_MODELS_PER_REPORT, description="operators' loads and unloads made here"),
    ] = []

    def __post_init__(self) -> None:
        if not urlsplit(self.address).hostname:
            raise ValueError(
                f"`$.address` must be an http:// or https:// URL with a host, not {self.address!r}"
            )
        if self.decide and not self.gateway:
            raise ValueError(
                "`$.decide` needs a `$.gateway` id: the decision lease is held by a named gateway"
            )


class GatewayPeer(msgspec.Struct, frozen=True):
    """One live gateway of a cluster, as its last report to this central replica described it."""

    id: str
    address: str
    workers: str
    models: list[ModelLoad]
    decider: Annotated[bool, msgspec.Meta(description="it holds the cluster's decision lease")]
    ops: list[Operation] = []


class ReportAnswer(msgspec.Struct, frozen=True):
    ok: bool
    cluster: str
    token_key: Annotated[
        str,
        msgspec.Meta(
            description="base64url (padded) of the 32-byte key this cluster verifies route tokens with"
        ),
    ]
    report_interval_s: float
    gateways: Annotated[
        list[GatewayPeer],
        msgspec.Meta(description="every live gateway of the cluster, the reporter included"),
    ] = []
    decider: Annotated[
        str, msgspec.Meta(description="the gateway holding the cluster's decision lease ('' if none)")
    ] = ""


class ModelView(ModelLoad, frozen=True, kw_only=True):
    load: float | None = None  # (in_flight + queue) / capacity; None where capacity is 0


class GatewayView(msgspec.Struct, frozen=True):
    """One gateway of a cluster on the status page and the cluster list."""

    id: str
    address: str
    workers: str
    live: bool
    last_report_s: float
    load: float | None  # (in_flight + queue) / capacity over its models; None where capacity is 0
    decider: bool = False


class ClusterView(msgspec.Struct, frozen=True):
    name: str
    address: str  # its least-loaded live gateway's
    live: bool  # any of its gateways is
    last_report_s: float  # since its latest report from any gateway
    load: float | None
    models: list[ModelView]  # summed over its live gateways
    gateways: list[GatewayView] = []


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
    avoid: Annotated[
        list[Text],
        msgspec.Meta(
            max_length=MAX_EXCLUDED,
            description="gateway URLs that could not be reached just now: the route leaves them out (a "
            "cluster with no other gateway serving the model is skipped)",
        ),
    ] = []


class RouteAnswer(msgspec.Struct, frozen=True):
    cluster: str
    url: str
    token: Annotated[str, msgspec.Meta(description="route token: Authorization: Bearer at the cluster")]
    expires_at: Annotated[int, msgspec.Meta(description="unix seconds")]
    model: str
    version: str
    latency_ms: Annotated[
        float,
        msgspec.Meta(description="the cluster's recent compute latency for the model (its last report)"),
    ] = 0.0
    fallbacks: Annotated[
        list[str],
        msgspec.Meta(
            description="the cluster's other live gateways serving the model, least loaded first: the same "
            "request with the same token goes to the next when one cannot be reached or is going away"
        ),
    ] = []
    # Absent unless central traced this route (--trace-endpoint): the device sends it on as the
    # inference's traceparent, so that request's trace holds both the route and the inference.
    traceparent: Traceparent | msgspec.UnsetType = msgspec.UNSET


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
