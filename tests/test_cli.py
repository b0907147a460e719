"""The command line: every command has --help with an example, and the serving side never imports torch."""

import json
import subprocess
import sys

from shoal.cli import COMMANDS


def shoal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True, timeout=120)


def test_every_command_has_help_with_an_example():
    top = shoal("--help")
    assert top.returncode == 0
    for name in COMMANDS:
        assert name in top.stdout
        r = shoal(name, "--help")
        assert r.returncode == 0, r.stderr
        assert "example:" in r.stdout and f"shoal {name}" in r.stdout


def test_serving_side_and_cli_do_not_import_torch():
    code = (
        "import sys, shoal.cli, shoal.gateway.server, shoal.worker.link, shoal.client.http, shoal.demo, shoal.bench.serving, shoal.bench.central;"
        "shoal.cli.build_parser();"
        "bad = [m for m in ('torch', 'matplotlib', 'flwr', 'tensorboard') if m in sys.modules];"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_gateway_refuses_to_start_without_credentials():
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--http", "127.0.0.1:0", "--workers", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SHOAL_CLUSTER_SECRET": "x"},
    )
    assert r.returncode == 2 and "--api-key" in r.stderr


def test_worker_with_unknown_model_says_where_it_looked(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "worker",
            "--model",
            "nope",
            "--repo",
            str(tmp_path),
            "--secret",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no versions of model 'nope'" in r.stderr


def test_config_file_env_and_flags_with_secrets_masked(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("name: site-a\nmax-queue: 64\ntimeout: 5\nstore-results: postgresql://u:hunter2@db/x\n")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(cfg), "--timeout", "7", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "SHOAL_CLUSTER_SECRET": "s3cret-value",
            "SHOAL_CLUSTER_MAX_QUEUE": "99",
        },
    )
    assert r.returncode == 0, r.stderr
    assert "name: site-a" in r.stdout and "max-queue: 99" in r.stdout and "timeout: 7.0" in r.stdout
    assert "s3cret-value" not in r.stdout and "hunter2" not in r.stdout
    cfg.write_text("max-queue: lots\n")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "key 'max-queue': expected int" in r.stderr
    cfg.write_text("colour: blue\n")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown key 'colour'" in r.stderr


def test_bench_runs_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "bench",
            "startup",
            "transfer",
            "--seconds",
            "1",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["machine"]["cpus"] >= 1
    assert figures["transfer"]["MB/s (3 MB requests, 8 clients)"] > 0
    runs = [float(x) for x in figures["startup"]["first answer after worker start, s (3 runs)"].split(" / ")]
    assert len(runs) == 3 and all(0 < x < 30 for x in runs)


def test_tour_commands_say_what_to_do(tmp_path):
    # `shoal bench` bare means every suite; a wrong name is refused saying the right ones.
    r = shoal("bench", "no-such-suite")
    assert r.returncode == 2 and "latency" in r.stderr
    import argparse

    from shoal.bench.cli import SUITES, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).suites == [] and list(SUITES)
    # PostgreSQL only when asked for; --quick exists.
    assert p.parse_args([]).central_pg is None and p.parse_args(["--quick"]).quick
    # `shoal certs` without the TLS extra names the extra instead of a traceback.
    code = "import sys; sys.modules['cryptography'] = None; from shoal.cli import main; sys.exit(main(['certs', '--out', 'x']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "shoal[tls]" in r.stderr and "Traceback" not in r.stderr
    # Adding an account prints one line, not the migration tool's narration.
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "central", "accounts", "add", "device", "cam-1", "--db", f"sqlite:///{tmp_path}/c.db"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "SHOAL_PASSWORD": "a-long-password"},
    )
    assert r.returncode == 0 and r.stdout.strip() == "added device cam-1" and r.stderr == "", r.stderr
    assert oct((tmp_path / "c.db").stat().st_mode & 0o777) == "0o600"  # it holds the master secret


def test_bad_api_key_declarations_are_refused_at_start():
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--http", "127.0.0.1:0", "--workers", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
         "--api-key", "device::k"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SHOAL_CLUSTER_SECRET": "x"},
    )
    assert r.returncode == 2 and "device:MODEL" in r.stderr


def test_an_abbreviated_flag_beats_the_config_file(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("max-queue: 77\nname: from-file\n")
    r = subprocess.run(
        [sys.executable, "-m", "shoal", "cluster", "--config", str(cfg), "--max-q", "5", "--print-config"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "SHOAL_CLUSTER_MAX_QUEUE": "9"},
    )
    assert r.returncode == 0, r.stderr
    assert "max-queue: 5" in r.stdout and "name: from-file" in r.stdout


def test_every_subcommand_and_training_family_has_an_example():
    """Below the commands too: federation's roles, central's accounts, every shoal train FAMILY."""
    import argparse

    from shoal.cli import build_parser
    from shoal.train.catalogue import FAMILIES
    from shoal.train.cli import family_parser

    def walk(p: argparse.ArgumentParser, path: str):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    for path, p in walk(build_parser(), "shoal"):
        if path != "shoal":
            assert "example:" in p.format_help(), path
    for fam in FAMILIES.values():
        text = family_parser(fam).format_help()
        assert "example:" in text and f"shoal train {fam.name}" in text.split("example:")[1], fam.name


def test_a_training_family_prints_its_help_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from shoal.cli import main\n"
        "sys.exit(main(['train', 'feedforward', '--help']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--hidden" in r.stdout and "shoal train feedforward --data cars" in r.stdout.split("example:")[1]
    assert "shoal[train]" in r.stdout
    # Running it says what to install, in one line.
    code = code.replace("'--help'", "'--epochs', '1'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'shoal[train]'" in r.stderr and "Traceback" not in r.stderr
