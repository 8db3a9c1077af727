"""The way a user looks at a run: `tensorboard --logdir` on a short train_2d.py run, read back over
TensorBoard's HTTP API (val_loss and the MSE-curve image), bound to 127.0.0.1 on a port the OS
picks, with bounded waits, and always stopped."""
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

import train_2d

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")
TIMEOUT = 90  # seconds for TensorBoard to start and load the run


def get(base, path, **query):
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else base + path
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read()


def wait_for(fn, deadline):
    """Calls fn() until it returns something non-empty (TensorBoard loads the run in the
    background), up to the deadline."""
    while True:
        try:
            value = fn()
            if value:
                return value
        except OSError:  # not listening yet, or an HTTP error while it loads
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("TensorBoard did not serve the run in time")
        time.sleep(0.5)


@pytest.mark.slow
def test_tensorboard_serves_val_loss_and_the_mse_curve(tmp_path, one_thread):
    summary = train_2d.main(["--dataset", "scg", "--num_epochs", "2", "--num_points", "400",
                             "--grid_size", "6", "--num_samples", "50", "--sample_steps", "5",
                             "--val_npoints", "8", "--log_dir", str(tmp_path), "--accelerator",
                             "cpu", "--devices", "1", "--num_threads", "1"])
    server = subprocess.Popen(
        [TENSORBOARD, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", "0",
         "--load_fast", "false", "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stderr], daemon=True).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        port = None
        while port is None:  # it prints "TensorBoard 2.x at http://127.0.0.1:PORT/ ..."
            try:
                match = re.search(r"http://127\.0\.0\.1:(\d+)/", lines.get(timeout=1))
                port = match and int(match.group(1))
            except queue.Empty:
                assert server.poll() is None, "tensorboard exited before serving"
                if time.monotonic() > deadline:
                    raise TimeoutError("TensorBoard did not start in time")
        base = f"http://127.0.0.1:{port}"
        run = os.path.basename(summary["run_dir"])

        runs = wait_for(lambda: json.loads(get(base, "/data/runs")), deadline)
        assert run in runs
        points = wait_for(lambda: json.loads(get(base, "/data/plugin/scalars/scalars",
                                                 run=run, tag="val_loss")), deadline)
        # [wall_time, step, value] per validation; the values are those the run reported
        assert [p[2] for p in points] == pytest.approx([h[1] for h in summary["history"]], rel=1e-6)

        images = wait_for(lambda: json.loads(get(base, "/data/plugin/images/images",
                                                 run=run, tag="mse_curve")), deadline)
        assert len(images) == len(summary["history"])  # one MSE curve per validation
        png = get(base, "/data/plugin/images/individualImage?" + images[-1]["query"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
