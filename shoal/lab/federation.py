"""The federation across the lab's machines (``shoal lab --scenario federation``): docs/fusion.md's
walkthrough with each party on a machine of its own, and one site's machine lost for a round.

* ``superlink``: ``shoal federation superlink`` (its Fleet API on the machine's address behind the
  gate, the private address on the machine's loopback), the operator's ``enroll`` of each site's
  public key and ``shoal federation run`` there too (the private address is reached from nowhere
  else, as docs/fusion.md asks);
* ``site-a``, ``site-b``, ``site-c``: ``shoal federation site`` (a SuperNode, over TLS, signing in
  with the site's own key) with its shard of MNIST (``paper:mnist``).

The fault: once the first round is logged, ``site-b``'s machine crashes (its link down, every
process on it killed: no goodbye reaches the SuperLink); once a round has closed without it, its
link comes back and its SuperNode is started again with the same key, as after a reboot. The run
must finish every round, publish the fused model, and take the site back.

``check_federation`` is the checker's part: pure, over the rounds' log and the fault's record.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.lab.procs import Processes
from shoal.lab.world import World, claim_run

SITES = ["site-a", "site-b", "site-c"]
LOST = "site-b"
PUBLIC_PORT, PRIVATE_PORT = 9092, 9093
ROUNDS = 9  # the lost site is taken back a minute after its crash (see run_site): rounds after that
# A site silent this long sits the round out (the default, 600 s, is long here); a restarted site's
# first reply (its app installed, its data loaded, on a loaded machine) must fit in it.
ROUND_TIMEOUT_S = 40.0
RUN_ARGS = [
    *["--template", "paper:mnist", "--topology", "ring", "--update", "sequential"],
    *["--fuse-every", "50steps", "--hidden", "32", "--lr", "0.05", "--batch", "10", "--seed", "1"],
    *["--rounds", str(ROUNDS), "--wait", "90", "--round-wait", "5"],
    *["--round-timeout", str(ROUND_TIMEOUT_S)],
]
DEADLINE_S = 420.0  # the whole federation run, or the lab gives up


def check_federation(rounds: list[dict[str, Any]], fault: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """Every round closed; the lost site absent from the rounds that closed while it was down and
    back after; when (from the crash) the first round closed without it; when (from its return) it
    was in a round again; and what the fused model scored on the sites' held-out rows."""
    done = [r for r in rounds if "round" in r]
    site = fault["machine"]
    lost, back = fault["start"], fault.get("heal")
    without = [r for r in done if r["time"] > lost and site not in r["sites"]]
    again = [r for r in done if back is not None and r["time"] > back and site in r["sites"]]
    final = next((r for r in rounds if "metric" in r), None)  # the published model's line
    return {
        "rounds": len(done),
        "sites_per_round": [len(r["sites"]) for r in done],
        "rounds_without_it": [r["round"] for r in without],
        "first_round_without_it_s": round(without[0]["time"] - lost, 3) if without else None,
        "back_in_round": again[0]["round"] if again else None,
        "back_in_a_round_s": round(again[0]["time"] - back, 3) if again and back is not None else None,
        "others_in_every_round": all(set(sites) - {site} <= set(r["sites"]) for r in done),
        "final": final,
    }


def federation_passed(row: dict[str, Any], rounds: int) -> bool:
    return (
        row["rounds"] == rounds
        and bool(row["rounds_without_it"])
        and row["back_in_round"] is not None
        and row["others_in_every_round"]
    )


def _wait(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"{what} within {timeout:g} s")
        time.sleep(every)


def _rounds(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return out


def run_federation(out: Path, run: int | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The federation scenario end to end; its summary (also in ``out / 'summary.json'``)."""
    from shoal.fusion.federation import make_site_keys
    from shoal.security.certs import make_ca, make_cert

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "pki", "keys", "models", "flwr-home"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in ("rounds.jsonl", "summary.json", "faults.json"):
        (out / f).unlink(missing_ok=True)
    world = World(claim_run(run))
    procs: Processes | None = None
    try:
        world.create()
        for name in ("superlink", *SITES):
            world.add(name)
        say(f"lab run {world.run}: bridge and {len(world.machines)} machines on 10.77.{world.run}.0/24")
        procs = Processes(world, out / "logs")
        link_ip = world.machines["superlink"].address
        pki, keys = out / "pki", out / "keys"
        make_ca(pki)
        make_cert(pki, "superlink", [link_ip, "127.0.0.1"], pki)  # sites: the address; the operator: loopback
        for s in SITES:
            make_site_keys(keys, s)
        env = {"FLWR_HOME": str(out / "flwr-home")}
        shoal = [sys.executable, "-m", "shoal", "federation"]
        ca = ["--ca", str(pki / "ca.pem")]
        private = f"127.0.0.1:{PRIVATE_PORT}"
        t = time.monotonic()
        superlink = procs.spawn(
            "superlink",
            "superlink",
            [*shoal, "superlink", "--certs", str(pki), "--address", f"{link_ip}:{PUBLIC_PORT}"]
            + ["--private", private, "--state", str(out / "fed.db")],
            env,
        )
        _wait(lambda: "sites connect to" in superlink.log.read_text() or not superlink.alive(), 90,
              "the SuperLink did not start")  # fmt: skip
        if not superlink.alive():
            raise RuntimeError(f"the SuperLink exited:\n{superlink.tail()}")
        for s in SITES:  # the operator enrols each site's public key, on the SuperLink's machine
            e = procs.spawn(
                "superlink", f"enroll-{s}", [*shoal, "enroll", "--superlink", private, *ca, "--name", s,
                                             str(keys / f"{s}.pub")], env)  # fmt: skip
            if e.popen.wait(60) != 0:
                raise RuntimeError(f"enrolling {s} failed:\n{e.tail()}")
        for s in SITES:
            procs.spawn(
                s, s, [*shoal, "site", "--superlink", f"{link_ip}:{PUBLIC_PORT}", *ca, "--key",
                       str(keys / f"{s}.key"), "--data", "paper:mnist", "--max-wait", "120"], env)  # fmt: skip
        log = out / "rounds.jsonl"
        runner = procs.spawn(
            "superlink", "run", [*shoal, "run", "--superlink", private, *ca, "--sites", *SITES, *RUN_ARGS,
                                 "--log", str(log), "--export", str(out / "models")], env)  # fmt: skip
        run_started = time.time()
        say(f"deployed in {time.monotonic() - t:.1f} s: a SuperLink and {len(SITES)} sites; the run started")

        def rounds() -> list[dict[str, Any]]:
            return [r for r in _rounds(log) if "round" in r]

        def ended_or(cond: Callable[[], bool]) -> Callable[[], bool]:
            return lambda: cond() or not runner.alive()

        _wait(ended_or(lambda: len(rounds()) >= 1), DEADLINE_S, "no round closed")
        say(f"round 1 closed; crash({LOST})")
        world.set_link(LOST, False)
        rec: dict[str, Any] = {"kind": "crash-rejoin", "machine": LOST, "label": f"crash({LOST}) and back"}
        rec["start"] = time.time()
        rec["killed_pids"] = procs.kill_machine(LOST) + world.kill_everything(LOST)
        _wait(ended_or(lambda: any(LOST not in r["sites"] for r in rounds())), DEADLINE_S,
              f"no round closed without {LOST}")  # fmt: skip
        say(f"a round closed without {LOST}; it comes back")
        world.set_link(LOST, True)
        rec["started_pids"] = [c.pid for c in procs.respawn(LOST)]
        rec["heal"] = time.time()
        _wait(lambda: not runner.alive(), DEADLINE_S, "the federation's run did not end")
        code = runner.popen.wait()
        say(f"the run ended (status {code})")
        all_rounds = _rounds(log)
        row = {"fault": rec["label"], **check_federation(all_rounds, rec, SITES)}
        manifests = sorted((out / "models").glob("*/*/manifest.json"))
        published = json.loads(manifests[-1].read_text()) if manifests else None
        metric = (published or {}).get("provenance", {}).get("metric", {})
        summary = {
            "scenario": "federation",
            "run": world.run,
            "sites": SITES,
            "run_status": code,
            "duration_s": round(time.time() - run_started, 3),
            "faults": [row],
            "published": str(manifests[-1].parent) if manifests else None,
            "accuracy": metric.get("accuracy"),
            "examples": metric.get("examples"),
        }
        summary["passed"] = code == 0 and federation_passed(row, ROUNDS) and published is not None
        (out / "faults.json").write_text(json.dumps([rec], indent=1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if procs is not None:
            procs.stop_all(timeout=10)
        world.release()
