"""Configuration: each command's settings declared once (shoal.config), read from flags, SHOAL_*
variables and a YAML file in that order, abbreviated flags included; errors name where; secrets masked."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest
import yaml

import shoal.config
from shoal.cli import build_parser, main
from shoal.config import ConfigError, MissingSetting, resolve


def settings(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """``shoal ARGV``'s arguments with its settings in force, in this environment only."""
    args = build_parser(only=argv[0]).parse_args(argv)
    resolve(args, env or {})
    return args


def printed(argv: list[str], monkeypatch, capsys, env: dict[str, str] | None = None) -> dict:
    """What ``--print-config`` shows, as the YAML it is."""
    for name in [k for k in __import__("os").environ if k.startswith("SHOAL_")]:
        monkeypatch.delenv(name)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture
def gw_file(tmp_path: Path):
    def write(text: str) -> str:
        path = tmp_path / "gw.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_flags_beat_variables_beat_the_file_beats_defaults(gw_file):
    cfg = gw_file("name: from-file\nmax-queue: 64\ntimeout: 5\nhttp: 0.0.0.0:9000\nno-auth: true\n")
    env = {"SHOAL_CLUSTER_MAX_QUEUE": "99", "SHOAL_CLUSTER_TIMEOUT": "6", "SHOAL_CLUSTER_NO_AUTH": "no"}
    args = settings(["cluster", "--config", cfg, "--timeout", "7"], env)
    assert args.timeout == 7.0  # flag over variable over file
    assert args.max_queue == 99  # variable over file
    assert args.no_auth is False  # a variable can turn off what the file turned on
    assert (args.name, args.http) == ("from-file", "0.0.0.0:9000")  # file over default
    assert (args.workers, args.read_timeout) == ("127.0.0.1:8003", 30.0)  # defaults
    assert settings(["cluster"]).max_queue == 1024


@pytest.mark.parametrize(
    ("argv", "attr", "value"),
    [
        (["--max-q", "5"], "max_queue", 5),  # an abbreviation argparse accepts is the flag
        (["--max-queue=5"], "max_queue", 5),
        (["--no-a"], "no_auth", True),
        (["--api", "operator:k"], "api_key", ["operator:k"]),
        (["--name", "from-flag"], "name", "from-flag"),
    ],
)
def test_an_abbreviated_flag_beats_the_file_and_the_environment(gw_file, argv, attr, value):
    cfg = gw_file("max-queue: 77\nno-auth: false\napi-key: [operator:file]\nname: from-file\n")
    env = {"SHOAL_CLUSTER_MAX_QUEUE": "9", "SHOAL_CLUSTER_NO_AUTH": "0", "SHOAL_CLUSTER_NAME": "from-env"}
    args = settings(["cluster", "--config", cfg, *argv], env)
    assert getattr(args, attr) == value


def test_abbreviations_of_every_command(tmp_path):
    (tmp_path / "w.yaml").write_text("model: m\nversion: 1\ndrain-timeout: 10\n")
    args = settings(["worker", "--config", str(tmp_path / "w.yaml"), "--vers", "2", "--drain", "3"])
    assert (args.model, args.version, args.drain_timeout) == ("m", "2", 3.0)
    (tmp_path / "c.yaml").write_text("db-timeout: 9\n")
    assert settings(["central", "--config", str(tmp_path / "c.yaml"), "--db-t", "2"]).db_timeout == 2.0


@pytest.mark.parametrize(
    ("argv", "variable", "attr", "value"),
    [
        (["cluster"], "SHOAL_CLUSTER_SECRET", "secret", "s"),
        (["cluster"], "SHOAL_API_KEYS", "api_key", ["operator:a", "scrape:b"]),
        (["cluster"], "SHOAL_TOKEN_KEY", "token_key", "s"),
        (["cluster"], "SHOAL_CENTRAL_PASSWORD", "central_password", "s"),
        (["worker", "--model", "m"], "SHOAL_CLUSTER_SECRET", "secret", "s"),
        (["worker", "--model", "m"], "SHOAL_MODEL_REPO", "repo", "s"),
        (["central"], "SHOAL_OPERATOR_PASSWORD", "operator_password", "s"),
        (["central"], "SHOAL_CENTRAL_DB", "db", "s"),
        (["central", "accounts", "add", "device", "d"], "SHOAL_PASSWORD", "password", "s"),
        (["infer", "f.png"], "SHOAL_DEVICE_PASSWORD", "password", "s"),
        (["infer", "f.png"], "SHOAL_DEVICE", "device", "s"),
        (["infer", "f.png"], "SHOAL_TOKEN", "token", "s"),
    ],
)
def test_every_documented_bare_variable_is_read(argv, variable, attr, value):
    text = ",".join(value) if isinstance(value, list) else value
    assert getattr(settings(argv, {variable: text}), attr) == value
    # and it is among the variables the command declares (what the deploy tests accept)
    assert variable in declared_variables(argv[0])


def declared_variables(command: str) -> set[str]:
    import importlib

    from shoal.cli import COMMANDS

    mod = importlib.import_module(COMMANDS[command])
    found = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, shoal.config.Settings)]
    return set().union(*(shoal.config.variables(c) for c in found if c is not shoal.config.Settings))


def test_a_bare_variable_is_the_default_and_a_list_s_items_are_added(tmp_path):
    (tmp_path / "w.yaml").write_text("secret: from-file\n")
    w = ["worker", "--model", "m"]
    # As documented ("default: $SHOAL_CLUSTER_SECRET"): the flag, SHOAL_WORKER_SECRET and the file
    # all come before the bare name; it stands in for an unset or empty setting.
    env = {"SHOAL_CLUSTER_SECRET": "bare"}
    assert settings([*w, "--secret", "flag"], env).secret == "flag"
    assert settings(w, {**env, "SHOAL_WORKER_SECRET": "own"}).secret == "own"
    assert settings([*w, "--config", str(tmp_path / "w.yaml")], env).secret == "from-file"
    assert settings([*w, "--secret", ""], env).secret == "bare"
    # SHOAL_API_KEYS adds its keys to those of the flags, the file or SHOAL_CLUSTER_API_KEY.
    (tmp_path / "gw.yaml").write_text("api-key: [device:m:file]\n")
    env = {"SHOAL_API_KEYS": "operator:a,scrape:b"}
    assert settings(["cluster", "--config", str(tmp_path / "gw.yaml")], env).api_key == [
        "device:m:file",
        "operator:a",
        "scrape:b",
    ]
    assert settings(["cluster", "--api-key", "x", "--api-key", "y"], env).api_key == [
        "x",
        "y",
        "operator:a",
        "scrape:b",
    ]
    assert settings(["cluster"], {**env, "SHOAL_CLUSTER_API_KEY": "own"}).api_key == [
        "own",
        "operator:a",
        "scrape:b",
    ]


def test_file_values_are_read_as_before(gw_file):
    cfg = gw_file(
        "max_queue: 8\n"  # an underscore spelling of the key
        "central: https://c1,https://c2\n"  # a list as one comma-separated string
        "results-max-age: 12h\n"  # a duration with a unit
        "max-body-mb: 2\n"  # an int where a float is declared
        "name: 2024\n"  # a YAML number where a string is declared
        "no-auth: 'yes'\n"
        "log-level: debug\n"
        "versions: {m: {policy: latest, n: 2}}\n"
    )
    args = settings(["cluster", "--config", cfg])
    assert (args.max_queue, args.central) == (8, ["https://c1", "https://c2"])
    assert (args.results_max_age, args.max_body_mb, args.name) == (43200.0, 2.0, "2024")
    assert (args.no_auth, args.log_level, args.versions) == (
        True,
        "debug",
        {"m": {"policy": "latest", "n": 2}},
    )
    env = {"SHOAL_CLUSTER_CENTRAL": "https://a,https://b", "SHOAL_CLUSTER_RESULTS_MAX_AGE": "30m"}
    args = settings(["cluster"], env)
    assert (args.central, args.results_max_age) == (["https://a", "https://b"], 1800.0)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("max-queue: lots\n", {}, "gw.yaml: key 'max-queue': expected int, got 'lots'"),
        ("no-auth: maybe\n", {}, "gw.yaml: key 'no-auth': expected true or false, got 'maybe'"),
        (
            "log-level: loud\n",
            {},
            "gw.yaml: key 'log-level': 'loud' is not one of debug, info, warning, error",
        ),
        ("results-max-age: soon\n", {}, "gw.yaml: key 'results-max-age': not a duration: 'soon'"),
        ("timeout: [1]\n", {}, "gw.yaml: key 'timeout': expected float, got [1]"),
        (
            "central: [https://c, {url: x}]\n",
            {},
            "gw.yaml: key 'central', item 2: expected str, got {'url': 'x'}",
        ),
        ("colour: blue\n", {}, "gw.yaml: unknown key 'colour' (known: advertise-workers, api-key, autoscale, central"),
        ("config: other.yaml\n", {}, "gw.yaml: unknown key 'config'"),
        ("print-config: true\n", {}, "gw.yaml: unknown key 'print-config'"),
        ("- a list\n", {}, "gw.yaml: must be a map of options"),
        ("name: [\n", {}, "gw.yaml: not valid YAML"),
        (
            "",
            {"SHOAL_CLUSTER_MAX_QUEUE": "x"},
            "environment variable SHOAL_CLUSTER_MAX_QUEUE: expected int, got 'x'",
        ),
        (
            "",
            {"SHOAL_CLUSTER_NO_AUTH": "maybe"},
            "environment variable SHOAL_CLUSTER_NO_AUTH: expected true or false",
        ),
    ],
)
def test_errors_name_the_file_or_variable_and_the_key(gw_file, text, env, message):
    with pytest.raises(ConfigError) as e:
        settings(["cluster", "--config", gw_file(text)], env)
    assert message in str(e.value)


def test_errors_reach_the_user_with_exit_status_2(gw_file, tmp_path, monkeypatch, capsys):
    assert main(["cluster", "--config", gw_file("max-queue: lots\n")]) == 2
    assert "shoal cluster: " in capsys.readouterr().err
    assert main(["cluster", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read" in capsys.readouterr().err
    # A required setting may come from the file or the environment; missing, argparse says so.
    (tmp_path / "w.yaml").write_text("model: from-file\n")
    assert settings(["worker", "--config", str(tmp_path / "w.yaml")]).model == "from-file"
    assert settings(["worker"], {"SHOAL_WORKER_MODEL": "from-env"}).model == "from-env"
    with pytest.raises(MissingSetting, match="--model"):
        settings(["worker"])
    monkeypatch.delenv("SHOAL_WORKER_MODEL", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["worker", "--secret", "x"])
    assert exit.value.code == 2 and "required: --model" in capsys.readouterr().err


def test_print_config_masks_every_secret_wherever_it_came_from(gw_file, monkeypatch, capsys):
    cfg = gw_file("central-password: file-pw\nstore-results: postgresql://u:hunter2@db/x\ntls-key: /k.pem\n")
    env = {
        "SHOAL_CLUSTER_SECRET": "env-secret",
        "SHOAL_API_KEYS": "operator:bare-key",
        "SHOAL_TOKEN_KEY": "bare-token-key",
    }
    out = printed(
        ["cluster", "--config", cfg, "--api-key", "scrape:flag-key", "--central", "https://c"],
        monkeypatch,
        capsys,
        env,
    )
    text = yaml.safe_dump(out)
    for value in ("file-pw", "hunter2", "env-secret", "bare-key", "flag-key", "bare-token-key"):
        assert value not in text
    assert out["secret"] == out["token-key"] == out["central-password"] == "***"
    assert out["api-key"] == ["***", "***"]
    assert out["store-results"] == "postgresql://u:***@db/x" and out["tls-key"] == "/k.pem"
    assert out["central"] == ["https://c"] and out["max-queue"] == 1024
    out = printed(
        ["central", "--db", "postgresql://shoal:pw@db/shoal"],
        monkeypatch,
        capsys,
        {"SHOAL_OPERATOR_PASSWORD": "op"},
    )
    assert out["db"] == "postgresql://shoal:***@db/shoal" and out["operator-password"] == "***"
    out = printed(["infer", "f.png"], monkeypatch, capsys, {"SHOAL_DEVICE_PASSWORD": "d", "SHOAL_TOKEN": "t"})
    assert out["password"] == out["token"] == "***"
    out = printed(["worker", "--model", "m"], monkeypatch, capsys, {"SHOAL_CLUSTER_SECRET": "w"})
    assert out["secret"] == "***" and out["model"] == "m"


def test_printed_settings_read_back_as_the_same_file(gw_file, monkeypatch, capsys, tmp_path):
    cfg = gw_file(
        "name: a\nmax-queue: 3\ncentral: [https://c]\nversions: {m: {policy: all}}\nlog-format: json\n"
    )
    first = printed(["cluster", "--config", cfg], monkeypatch, capsys)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(first))
    assert printed(["cluster", "--config", str(tmp_path / "again.yaml")], monkeypatch, capsys) == first


def test_help_shows_declared_defaults_and_variables(capsys):
    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 127.0.0.1:8000)" in out and "$SHOAL_API_KEYS" in out
    with pytest.raises(SystemExit):
        main(["central", "accounts", "add", "--help"])
    assert "$SHOAL_PASSWORD" in capsys.readouterr().out


def test_configuration_uses_no_argparse_internals():
    source = inspect.getsource(shoal.config)
    assert "._actions" not in source and "argparse._" not in source and "_add_action" not in source


def test_a_gateway_s_version_policies_are_typed():
    from shoal.gateway.policy import VersionPolicy, parse_version_policy, visible_versions

    assert parse_version_policy({"policy": "latest", "n": 2}, "v") == VersionPolicy("latest", n=2)
    assert parse_version_policy({"policy": "specific", "versions": [1, "3"]}, "v") == VersionPolicy(
        "specific", versions=("1", "3")
    )
    assert parse_version_policy({"policy": "all"}, "v") == VersionPolicy()
    assert visible_versions(VersionPolicy("latest", n=1), ["2", "10", "9"]) == {"10"}
