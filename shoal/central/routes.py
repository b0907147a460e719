"""What each of central's operations does, and the route table that declares them.

Handlers get a ``Call`` whose credentials, body, query and path parameters the application has
already checked and decoded (``app.py``), and return a message of ``protocol/central_messages.py``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING, Annotated

import msgspec
from starlette.responses import Response

from shoal.central.app import DATABASE_ERRORS, Call, Credentials, Operation, RouteTable, respond
from shoal.central.config import CentralConfig
from shoal.central.db import AccountExists
from shoal.central.directory import TooManyGateways, serving
from shoal.central.errors import RETRY_SOON, HttpError
from shoal.protocol.central_messages import (
    AccountAdded,
    AccountKind,
    AccountList,
    AccountRemoved,
    Ack,
    AckAnswer,
    ClusterList,
    CommandAdded,
    CommandId,
    CommandList,
    Health,
    Name,
    NewAccount,
    NewCommand,
    Report,
    ReportAnswer,
    RouteAnswer,
    RouteRequest,
    Session,
    Status,
)
from shoal.security.tokens import sign_token

if TYPE_CHECKING:
    from shoal.central.parts import CentralParts

log = logging.getLogger("shoal.central")

OPERATOR = Credentials("operator")
CLUSTER = Credentials("cluster")
DEVICE = Credentials("device")
DEVICE_OR_SESSION = Credentials("device", session=True)


# ------------------------------------------------------------------------------------- public


async def status_page(c: CentralParts, call: Call) -> Response:
    # Behind operator Basic auth: the browser asks once, then sends the same credentials with the
    # page's own requests to /v1/status.
    return respond(c.page, media_type="text/html; charset=utf-8")


async def metrics(c: CentralParts, call: Call) -> Response:
    # Operator credentials, like the rest of the status: Prometheus scrapes with basic_auth.
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return respond(generate_latest(c.metrics), media_type=CONTENT_TYPE_LATEST)


async def health(c: CentralParts, call: Call) -> Health:
    return Health(ok=True, replica=c.replica)


async def openapi(c: CentralParts, call: Call) -> Response:
    return respond(c.openapi)


# ------------------------------------------------------------------------------------- devices


async def login(c: CentralParts, call: Call) -> Session:
    c.directory.seen(call.who)
    return c.auth.session(call.who)


async def route(c: CentralParts, call: Call) -> RouteAnswer:
    req: RouteRequest = call.body
    span = call.span  # central traces this route (--trace-endpoint, and sampled)
    if span is not None:
        span.update_name(f"route {req.model}")
        span.set_attribute("shoal.model", req.model)
    c.directory.seen(call.who)
    now = time.monotonic()
    choice = c.directory.choose(req.model, req.version, req.exclude, now, req.avoid)
    if choice is None:
        what = f"model '{req.model}'" + (f" version '{req.version}'" if req.version is not None else "")
        if c.directory.starting(now):
            raise HttpError(
                503,
                f"central has just started and clusters are reporting; no route for {what} yet",
                RETRY_SOON,
            )
        extra = f" (excluding {', '.join(req.exclude)})" if req.exclude else ""
        raise HttpError(404, f"no live cluster serves {what}{extra}")
    name = choice.cluster.name
    wall = time.time()
    ttl = c.config.token_ttl_s
    claims = {"aud": name, "sub": call.who, "model": req.model}
    if req.version is not None:
        claims["version"] = req.version  # the token then opens that version only
    token = sign_token(claims, c.keys.route(name), ttl, now=wall)
    url, *fallbacks = choice.urls
    version = choice.entry.version
    traceparent: str | msgspec.UnsetType = msgspec.UNSET
    if span is not None:
        span.set_attributes({"shoal.cluster": name, "shoal.gateway": url, "shoal.version": version})
        assert c.tracing is not None
        traceparent = c.tracing.traceparent(span)  # the device's inference continues it
    return RouteAnswer(
        name, url, token, int(wall + ttl), req.model, version, choice.entry.latency_ms, fallbacks, traceparent
    )


async def get_commands(c: CentralParts, call: Call) -> CommandList:
    c.directory.seen(call.who)
    cmds = await c.commands.wait(call.who, call.query.get("wait", 0.0))
    c.directory.seen(call.who)
    return CommandList(cmds)


async def ack_command(c: CentralParts, call: Call) -> AckAnswer:
    cid: int = call.params["id"]
    ack: Ack = call.body
    if not await c.store.ack_command(call.who, cid, ack.result):
        raise HttpError(404, f"no unacknowledged command {cid} for device {call.who!r}")
    c.directory.seen(call.who)
    return AckAnswer(ok=True, id=cid)


# ------------------------------------------------------------------------------------ clusters


async def report(c: CentralParts, call: Call) -> ReportAnswer:
    rep: Report = call.body
    d, name, gid = c.directory, call.who, rep.gateway
    asked_before = d.asked_to_decide(name, gid)
    served_before = d.serving(name, gid)
    now = time.monotonic()
    try:
        if d.report(name, rep, now):
            log.info("cluster %r is live at %s with %d model versions", name, rep.address, len(rep.models))
    except TooManyGateways as e:
        raise HttpError(409, str(e)) from None
    served = serving(rep.models)
    if served_before is not None and served != served_before:
        log.info(
            "cluster %r%s now serves %s",
            name,
            f" (gateway {gid})" if gid else "",
            ", ".join(f"{m} v{v}" for m, v in sorted(served)) or "no model",
        )
    wall = time.time()
    if rep.decide or asked_before or (gid and d.decider(name) == gid):
        decider = await _decision_lease(c, name, gid, rep.decide, wall)
    else:
        decider = d.decider(name, wall)  # no database write for gateways that do not ask
    key = base64.urlsafe_b64encode(c.keys.route(name)).decode("ascii")
    return ReportAnswer(
        ok=True,
        cluster=name,
        token_key=key,
        report_interval_s=c.config.report_interval_s,
        gateways=d.peers(name, now, wall),
        decider=decider,
    )


async def _decision_lease(c: CentralParts, cluster: str, gateway: str, decide: bool, wall: float) -> str:
    """Take or extend the cluster's decision lease for ``gateway`` (``decide``), or release it; the
    holder. The database unreachable: the lease is left as it is and the answer is the holder this
    replica learnt last (it may have expired meanwhile; the gateways learn better once it is back)."""
    d = c.directory
    lease_s = max(3.0, 3 * c.config.report_interval_s)
    try:
        # Bounded by the report interval: a report answers in time, database or not.
        bound = min(c.config.db_timeout_s, c.config.report_interval_s)
        if decide:
            holder, until = await asyncio.wait_for(c.store.take_lease(cluster, gateway, lease_s, wall), bound)
            if holder != d.decider(cluster):
                log.info("gateway %r of cluster %r holds the decision lease", holder, cluster)
            d.learn_decider(cluster, holder, until)
            return holder
        await asyncio.wait_for(c.store.release_lease(cluster, gateway), bound)
        if d.decider(cluster) == gateway:
            d.learn_decider(cluster, "", 0.0)
        return d.decider(cluster, wall)
    except DATABASE_ERRORS as e:
        log.warning(
            "decision lease of cluster %r unchanged, the database is unreachable: %s",
            cluster,
            str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
        )
        return d.decider(cluster)


# ------------------------------------------------------------------------------------ operators


async def clusters(c: CentralParts, call: Call) -> ClusterList:
    return ClusterList(c.directory.live_views(), c.config.report_interval_s)


async def status(c: CentralParts, call: Call) -> Status:
    return await c.status()


async def add_account(c: CentralParts, call: Call) -> AccountAdded:
    new: NewAccount = call.body
    if len(new.password.encode("utf-8")) > 1024:
        raise HttpError(400, "invalid body: password must be at most 1024 bytes - at `$.password`")
    try:
        await c.store.add_account(new.kind, new.name, await c.auth.hash(new.password))
    except AccountExists as e:
        raise HttpError(409, str(e)) from None
    log.info("operator %r added %s account %r", call.who, new.kind, new.name)
    return AccountAdded(new.kind, new.name)


async def list_accounts(c: CentralParts, call: Call) -> AccountList:
    return AccountList(await c.store.list_accounts(call.query.get("kind")))


async def remove_account(c: CentralParts, call: Call) -> AccountRemoved:
    kind, name = call.params["kind"], call.params["name"]
    if kind == "operator" and await c.store.count_accounts("operator") <= 1:
        if await c.store.password_hash(kind, name) is not None:
            raise HttpError(409, "refusing to remove the last operator account")
    if not await c.store.remove_account(kind, name):
        raise HttpError(404, f"no {kind} account named {name!r}")
    c.auth.forget()
    if kind == "cluster":
        c.directory.forget(name)
    log.info("operator %r removed %s account %r", call.who, kind, name)
    return AccountRemoved(removed=True, kind=kind, name=name)


async def post_command(c: CentralParts, call: Call) -> CommandAdded:
    device: str = call.params["name"]
    new: NewCommand = call.body
    if await c.store.password_hash("device", device) is None:
        raise HttpError(404, f"no device account named {device!r}")
    cid = await c.commands.add(device, new.command, new.args, call.who)
    return CommandAdded(cid, device, new.command)


# --------------------------------------------------------------------------------------- table


def route_table(config: CentralConfig) -> RouteTable:
    wait = Annotated[
        float,
        msgspec.Meta(ge=0, le=config.max_wait_s, description="seconds to wait for a command (long poll)"),
    ]
    return RouteTable(
        [
            # Routes and reports first: they are most of central's traffic, and routing tries in order.
            Operation(
                "POST",
                "/v1/route",
                "the least-loaded live cluster serving a model, its gateways in turn, with a route token for it",
                route,
                DEVICE_OR_SESSION,
                body=RouteRequest,
                answer=RouteAnswer,
                errors=(404,),
                headers={
                    "traceparent": (
                        {"type": "string"},
                        "W3C trace context: the route's span continues it when central traces "
                        "(--trace-endpoint); a malformed one is ignored",
                    )
                },
                span="route",
            ),
            Operation(
                "POST",
                "/v1/clusters/report",
                "a cluster gateway's report (every report_interval_s); the account name is the cluster name",
                report,
                CLUSTER,
                body=Report,
                answer=ReportAnswer,
                errors=(409,),
            ),
            Operation("GET", "/", "the status page (HTML)", status_page, OPERATOR, media_type="text/html"),
            Operation(
                "GET",
                "/metrics",
                "Prometheus metrics (text format)",
                metrics,
                OPERATOR,
                media_type="text/plain",
            ),
            Operation("GET", "/v1/health", "liveness of this replica", health, None, answer=Health),
            Operation("GET", "/v1/openapi.json", "this document (OpenAPI 3.1)", openapi, None),
            Operation("POST", "/v1/login", "a device session token", login, DEVICE, answer=Session),
            Operation(
                "GET",
                "/v1/clusters",
                "the live clusters, their models and load",
                clusters,
                OPERATOR,
                answer=ClusterList,
            ),
            Operation(
                "GET",
                "/v1/status",
                "clusters, models, load, devices seen recently, counters",
                status,
                OPERATOR,
                answer=Status,
            ),
            Operation(
                "POST",
                "/v1/accounts",
                "add an account",
                add_account,
                OPERATOR,
                body=NewAccount,
                answer=AccountAdded,
                status=201,
                errors=(409,),
            ),
            Operation(
                "GET",
                "/v1/accounts",
                "accounts (never their secrets)",
                list_accounts,
                OPERATOR,
                answer=AccountList,
                query={"kind": AccountKind},
            ),
            Operation(
                "DELETE",
                "/v1/accounts/{kind}/{name}",
                "remove an account",
                remove_account,
                OPERATOR,
                answer=AccountRemoved,
                errors=(404, 409),
                params={"kind": AccountKind, "name": str},
            ),
            Operation(
                "POST",
                "/v1/devices/{name}/commands",
                "post a command for a device",
                post_command,
                OPERATOR,
                body=NewCommand,
                answer=CommandAdded,
                status=201,
                errors=(404,),
                params={"name": Name},
            ),
            Operation(
                "GET",
                "/v1/commands",
                "this device's unacknowledged commands; waits up to `wait` seconds for one (long poll)",
                get_commands,
                DEVICE_OR_SESSION,
                answer=CommandList,
                query={"wait": wait},
            ),
            Operation(
                "POST",
                "/v1/commands/{id}/ack",
                'acknowledge a command, optionally with {"result": ...}',
                ack_command,
                DEVICE_OR_SESSION,
                body=Ack,
                body_optional=True,
                answer=AckAnswer,
                errors=(404,),
                params={"id": CommandId},
            ),
        ]
    )
