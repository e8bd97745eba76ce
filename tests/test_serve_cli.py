"""`tandem serve` as a new user runs it (what `make serve` does): the real SmolLM2, a
chat request over plain HTTP gets a sensible answer, and Ctrl-C stops every process."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from launcher.serve import free_port


@pytest.mark.slow
def test_tandem_serve_answers_and_stops(smollm2_dir, tmp_path):
    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "launcher.main", "serve", "--model", str(smollm2_dir), "--port",
                             str(port), "--grpc-port", str(gport), "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        deadline = time.monotonic() + 300
        while not any("tandem is serving" in line for line in out):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(out)
            out.append(line)
            assert time.monotonic() < deadline, "".join(out)
        body = {"model": smollm2_dir.name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0, "max_tokens": 20}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["message"]["content"]
        print("SmolLM2 via tandem serve:", text)
        assert "Paris" in text
        children = [int(p) for p in re.findall(r"^\s*(\d+)", subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout, re.M)]
        assert len(children) == 4, children  # redis, prefill, decode, gateway
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, "".join(out) + rest
    assert "stopped" in rest
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
