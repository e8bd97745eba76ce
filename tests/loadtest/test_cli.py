"""`tandem bench serve` and `tandem bench sweep` as a user runs them: real subprocesses
against the fake OpenAI server (tests/loadtest/fake_server.py), itself a subprocess."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).with_name("fake_server.py")


def tandem(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.main", "--log-level", "INFO", "bench", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("sub, flags", [
    ([], ["serve", "sweep"]),
    (["serve"], ["--base-url", "--backend", "--request-rate", "--max-concurrency", "--goodput", "--slo-ttft-ms",
                 "--dataset-name", "--random-range-ratio", "--num-warmups", "--duration", "--result-filename"]),
    (["sweep"], ["--rates", "--stack", "--stack-url", "--base-url", "--goodput", "--plot"]),
])
def test_help(sub, flags):
    r = tandem(*sub, "--help")
    assert r.returncode == 0, r.stderr
    for flag in flags:
        assert flag in r.stdout


@pytest.mark.parametrize("args, message", [
    (["serve", "--request-rate", "0"], "rate must be > 0"),
    (["serve", "--backend", "http"], "invalid choice"),
    (["serve", "--goodput", "itl:5"], "goodput"),
    (["serve", "--random-input-len", "-4"], "input_len"),
    (["serve", "--dataset-name", "jsonl"], "dataset_path"),
    (["serve", "--dataset-name", "jsonl", "--dataset-path", "/nonexistent.jsonl", "--model", "m"], "dataset_path"),
    (["sweep", "--rates", "1,x"], "rate"),
    (["sweep", "--stack", "a=true"], "stack_url"),
    (["sweep", "--base-url", "nourl"], "NAME=VALUE"),
    (["sweep"], "targets"),
])
def test_argument_errors_are_named(args, message, capsys):
    """In process (the same launcher.main.main as the command), to keep the suite quick."""
    from launcher.main import main

    try:
        code = main(["--log-level", "WARNING", "bench", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_serve_prints_the_table_and_writes_json_and_plot(fake_url, tmp_path):
    r = tandem("serve", "--base-url", fake_url, "--num-prompts", "20", "--request-rate", "200",
               "--random-input-len", "16", "--random-output-len", "5", "--slo-ttft-ms", "5000",
               "--result-dir", str(tmp_path), "--result-filename", "run.json", "--plot")
    assert r.returncode == 0, r.stderr
    assert "Serving Benchmark Result" in r.stdout and "Mean TTFT (ms):" in r.stdout
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["completed"] == 20 and result["total_output_tokens"] == 100
    assert result["total_input_tokens"] == 320 and result["request_rate"] == 200.0
    assert result["good_requests"] == 20 and "generated_texts" not in result  # only with --save-detailed
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_serve_against_nothing_fails_cleanly(tmp_path):
    r = tandem("serve", "--port", str(free_port()), "--num-prompts", "1", "--result-dir", str(tmp_path))
    assert r.returncode == 1 and "is the server up" in r.stderr and "Traceback" not in r.stderr


def test_sweep_starts_and_stops_a_stack_and_compares_it(fake_url, tmp_path):
    port = free_port()
    stack_url = f"http://127.0.0.1:{port}"
    r = tandem("sweep", "--base-url", f"running={fake_url}",
               "--stack", f"started={sys.executable} {FAKE} --port {port}", "--stack-url", f"started={stack_url}",
               "--rates", "100,inf", "--num-prompts", "8", "--random-input-len", "8", "--random-output-len", "4",
               "--goodput", "ttft:5000", "--stack-stop-timeout", "5", "--disable-tqdm",
               "--result-dir", str(tmp_path), "--result-filename", "sweep.json")
    assert r.returncode == 0, r.stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert list(sweep["runs"]) == ["running", "started"] and sweep["errors"] == {}
    for runs in sweep["runs"].values():
        assert [run["request_rate"] for run in runs] == [100.0, "inf"]
        assert all(run["completed"] == 8 and run["good_requests"] == 8 for run in runs)
        assert "ttfts" not in runs[0]  # per-request arrays only with --save-detailed
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert "started" in r.stdout and "TTFT p90" in r.stdout
    assert "SIGINT" in r.stderr and not healthy(stack_url)  # stopped, not left running
    assert (tmp_path / "stack-started.log").exists()


def test_sweep_reports_a_stack_that_dies(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = tandem("sweep", "--stack", "broken=echo starting; exit 3", "--stack-url", f"broken={url}",
               "--rates", "1", "--num-prompts", "1", "--result-dir", str(tmp_path), "--result-filename", "s.json")
    assert r.returncode == 1 and "exited with status 3" in r.stderr and "starting" in r.stderr
    assert "broken: FAILED" in r.stdout
