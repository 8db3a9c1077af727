"""The README's Python example runs as written (its first ```python block, from the repository
root), and its numbers mean what the comments say."""
import math
import os
import re

import torch as t

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_example_runs_as_written(one_thread, monkeypatch):
    monkeypatch.chdir(REPO)
    with open(os.path.join(REPO, "README.md")) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S)[1]
    scope = {}
    t.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    # an untrained net with a Gaussian residual is the data-matched Gaussian: its training loss
    # is -log q on average, and every pointwise estimate is -log q(x) exactly (zero integrand)
    dm, x = scope["dm"], scope["x"]
    q = dm.reference.nll(x[:8])
    nll, stderr = dm.nll_points(x[:8], npoints=1024, seed=0)  # as the README computes it
    assert t.allclose(scope["nll"], q, atol=1e-5) and t.equal(scope["nll"], nll)
    assert (stderr == 0).all()
    assert math.isfinite(scope["loss"].item()) and scope["samples"].shape == (1000, 2)
    # p(y | x) sums to about one (jackknifed: to e^c, c second order in the integration noise)
    assert scope["log_post"].shape == (8, 2)
    assert (scope["log_post"].logsumexp(1).abs() < 0.05).all()
