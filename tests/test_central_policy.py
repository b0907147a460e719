"""The route choice and the password store as pure functions: no server, no database."""

import pytest

from shoal.central import passwords
from shoal.central.policy import (
    ClusterInfo,
    GatewayInfo,
    ModelLoad,
    choose_cluster,
    cluster_of,
    is_live,
    load_of,
    merge_models,
    version_key,
)

NOW = 1000.0


def cluster(name, *models, age=0.0, address=None):
    return ClusterInfo(name, address or f"http://{name}:8000", tuple(models), NOW - age)


def m(name="mnist", version="1", in_flight=0, capacity=10, queue=0, latency_ms=1.0, ready=True):
    return ModelLoad(name, version, ready, in_flight, capacity, queue, latency_ms, 1)


def pick(clusters, model="mnist", version=None, exclude=(), assigned=None):
    c = choose_cluster(clusters, model, version, exclude, now=NOW, max_age_s=3.0, assigned=assigned)
    return None if c is None else (c.cluster.name, c.entry.version)


def test_least_loaded_wins_counting_queue_against_capacity():
    a = cluster("a", m(in_flight=5, capacity=10))
    b = cluster("b", m(in_flight=3, queue=4, capacity=10))
    c = cluster("c", m(in_flight=10, capacity=40))  # 0.25: the least loaded relative to its capacity
    assert pick([a, b, c]) == ("c", "1")


def test_ties_go_to_lower_latency_then_name():
    assert pick([cluster("b", m(latency_ms=2)), cluster("a", m(latency_ms=3))]) == ("b", "1")
    assert pick([cluster("b", m()), cluster("a", m())]) == ("a", "1")


def test_only_live_ready_clusters_serving_the_model_count():
    dead = cluster("a", m(), age=3.0)  # three report intervals without a report: out
    unready = cluster("b", m(ready=False))
    other = cluster("c", m(name="resnet"))
    assert pick([dead, unready, other]) is None
    assert pick([cluster("d", m(in_flight=9), age=2.9), dead]) == ("d", "1")


def test_version_is_matched_exactly_and_the_newest_is_preferred_without_one():
    a = cluster("a", m(version="9", in_flight=0))
    b = cluster("b", m(version="10", in_flight=9))
    assert pick([a, b], version="9") == ("a", "9")
    assert pick([a, b]) == ("b", "10")  # 10 is newer than 9, even though b is busier
    assert pick([a, b], version="11") is None
    assert sorted(["10", "9", "beta", "2"], key=version_key) == ["beta", "2", "9", "10"]
    # Digits int() refuses are names, not numbers ("²".isdigit() is true).
    assert sorted(["10", "²", "9"], key=version_key) == ["²", "9", "10"]


def test_exclude_skips_clusters_the_device_failed_on():
    a, b = cluster("a", m()), cluster("b", m(in_flight=5))
    assert pick([a, b], exclude=["a"]) == ("b", "1")
    assert pick([a, b], exclude=["a", "b"]) is None


def test_routes_handed_out_since_the_last_report_spread_a_burst():
    a, b = cluster("a", m(capacity=10)), cluster("b", m(capacity=10))
    assigned: dict[str, float] = {}
    for _ in range(10):
        name, _v = pick([a, b], assigned=assigned)
        assigned[name] = assigned.get(name, 0) + 1
    assert assigned == {"a": 5, "b": 5}


def test_with_one_cluster_loaded_new_devices_go_to_the_other():
    loaded, idle = cluster("a", m(in_flight=90, capacity=100)), cluster("b", m(capacity=100))
    assigned: dict[str, float] = {}
    for _ in range(50):
        name, _v = pick([loaded, idle], assigned=assigned)
        assigned[name] = assigned.get(name, 0) + 1
    assert assigned == {"b": 50}


def test_zero_capacity_is_full_but_still_a_last_resort():
    assert load_of(m(capacity=0)) == float("inf")
    assert pick([cluster("a", m(capacity=0)), cluster("b", m(in_flight=100))]) == ("b", "1")
    assert pick([cluster("a", m(capacity=0))]) == ("a", "1")


def test_password_hash_round_trip_and_format():
    h = passwords.hash_password("correct horse", n=2**10)
    assert h.startswith("scrypt$1024$8$1$") and "correct" not in h
    assert passwords.verify_password("correct horse", h)
    assert not passwords.verify_password("correct hors", h)
    assert not passwords.verify_password("x", "garbage")
    assert passwords.hash_password("same", n=2**10) != passwords.hash_password("same", n=2**10)  # salted


@pytest.mark.parametrize(
    "pw,ok", [("short", False), ("long enough", True), (None, False), ("x" * 2000, False)]
)
def test_new_password_rules(pw, ok):
    assert (passwords.check_new_password(pw) is None) == ok


def test_verified_cache_expires_and_keys_on_the_password():
    c = passwords.VerifiedCache(ttl_s=10)
    c.add("device", "cam", "pw", now=0)
    assert c.hit("device", "cam", "pw", now=5)
    assert not c.hit("device", "cam", "other", now=5)
    assert not c.hit("cluster", "cam", "pw", now=5)
    assert not c.hit("device", "cam", "pw", now=11)
    assert all(b"pw" not in k for k in c._entries)


def test_a_cluster_where_the_model_sleeps_is_chosen_only_when_none_has_it_awake():
    asleep = ModelLoad("mnist", "1", ready=False, capacity=0, asleep=True)
    busy = cluster("busy", m(in_flight=9, capacity=10))
    sleepy = cluster("sleepy", asleep)
    assert pick([sleepy, busy]) == ("busy", "1")  # awake, even nearly full, before waking another
    assert pick([sleepy]) == ("sleepy", "1")  # the only one that can serve it: it will wake it
    assert pick([sleepy, cluster("down", ModelLoad("mnist", "1", ready=False))]) == ("sleepy", "1")


# ------------------------------------------------------------------- clusters of several gateways


def gw(gid, *models, age=0.0):
    return GatewayInfo(gid, f"http://{gid}:8000", tuple(models), NOW - age, f"{gid}:8003")


def test_a_clusters_gateways_add_up_capacity_and_load_and_merge_the_rest():
    a = gw("a", ModelLoad("mnist", "1", True, 4, 10, 2, 2.0, 2))
    b = gw("b", ModelLoad("mnist", "1", False, 1, 30, 0, 6.0, 3, asleep=False))
    c = cluster_of("site", [b, a], NOW, 3.0)
    (merged,) = c.models
    assert (merged.in_flight, merged.queue, merged.capacity, merged.workers) == (5, 2, 40, 3)
    assert merged.ready and not merged.asleep and merged.latency_ms == (2.0 * 10 + 6.0 * 30) / 40
    assert c.address == "http://b:8000" and [g.id for g in c.gateways] == ["a", "b"]  # b: 1/30, a: 6/10
    c2 = cluster_of("site", [gw("a", m(in_flight=6)), gw("b", m(in_flight=1))], NOW, 3.0)
    assert c2.address == "http://b:8000"
    asleep = [gw(x, ModelLoad("mnist", "1", False, capacity=0, asleep=True)) for x in "ab"]
    assert cluster_of("site", asleep, NOW, 3.0).models[0].asleep
    assert merge_models([[m(capacity=0, latency_ms=2)], [m(capacity=0, latency_ms=4)]])[0].latency_ms == 3.0


def test_a_silent_gateway_drops_out_and_the_cluster_lives_while_any_gateway_does():
    live, silent = gw("a", m(in_flight=1)), gw("b", m(in_flight=9), age=3.0)
    c = cluster_of("site", [live, silent], NOW, 3.0)
    assert [g.id for g in c.gateways] == ["a"] and c.models[0].in_flight == 1 and is_live(c, NOW, 3.0)
    gone = cluster_of("site", [gw("a", m(), age=5.0), gw("b", m(in_flight=2), age=4.0)], NOW, 3.0)
    assert not is_live(gone, NOW, 3.0) and gone.models[0].in_flight == 2  # what it served last
    assert pick([gone]) is None


def test_the_cluster_is_chosen_on_its_summed_load_then_its_least_loaded_gateway_first():
    # Two gateways half full make a cluster at 0.5; one gateway at 0.6 elsewhere loses to it.
    two = cluster_of("two", [gw("x", m(in_flight=5)), gw("y", m(in_flight=5))], NOW, 3.0)
    one = cluster_of("one", [gw("z", m(in_flight=6))], NOW, 3.0)
    choice = choose_cluster([one, two], "mnist", now=NOW)
    assert choice is not None and choice.cluster.name == "two"
    assert choice.urls == ["http://x:8000", "http://y:8000"]  # a tie: by id
    site = cluster_of(
        "site", [gw("a", m(in_flight=7)), gw("b", m(in_flight=2)), gw("c", m(name="other"))], NOW, 3.0
    )
    choice = choose_cluster([site], "mnist", now=NOW)
    assert choice is not None and choice.urls == ["http://b:8000", "http://a:8000"]  # c serves another model
    # Routes handed out since b's last report count against b.
    choice = choose_cluster([site], "mnist", now=NOW, gateway_assigned={"site": {"b": 6.0}})
    assert choice is not None and choice.urls == ["http://a:8000", "http://b:8000"]
    # Awake before asleep, whatever the load; and a cluster given without gateways keeps its address.
    sleepy = cluster_of(
        "s", [gw("a", ModelLoad("mnist", "1", False, asleep=True)), gw("b", m(in_flight=9))], NOW, 3.0
    )
    assert choose_cluster([sleepy], "mnist", now=NOW).urls == ["http://b:8000", "http://a:8000"]
    assert choose_cluster([cluster("old", m())], "mnist", now=NOW).urls == ["http://old:8000"]


def test_routes_spread_over_a_clusters_gateways_within_one_report_interval():
    site = cluster_of("site", [gw("a", m()), gw("b", m())], NOW, 3.0)
    per_gateway: dict[str, float] = {}
    for _ in range(10):
        choice = choose_cluster([site], "mnist", now=NOW, gateway_assigned={"site": per_gateway})
        first = choice.gateways[0].id
        per_gateway[first] = per_gateway.get(first, 0) + 1
    assert per_gateway == {"a": 5, "b": 5}


def test_gateways_a_device_could_not_reach_are_left_out_and_a_cluster_left_with_none_is_skipped():
    two = cluster_of("two", [gw("x", m(in_flight=1)), gw("y", m(in_flight=5))], NOW, 3.0)
    one = cluster_of("one", [gw("z", m(in_flight=9))], NOW, 3.0)
    choice = choose_cluster([one, two], "mnist", now=NOW, avoid=["http://x:8000/"])
    assert choice is not None and choice.cluster.name == "two" and choice.urls == ["http://y:8000"]
    choice = choose_cluster([one, two], "mnist", now=NOW, avoid=["http://x:8000", "http://y:8000"])
    assert choice is not None and choice.cluster.name == "one"  # two has no gateway left
    assert choose_cluster([two], "mnist", now=NOW, avoid=["http://x:8000", "http://y:8000"]) is None
