"""Closed-form denoisers with closed-form densities: the exact answers the estimator is tested on.

A Gaussian mixture p(x) = sum_m pi_m N(mu_m, Sigma_m) pushed through the channel
z = sqrt(s(a)) x + sqrt(s(-a)) eps has the marginal sum_m pi_m N(sqrt(s(a)) mu_m, s(a) Sigma_m + s(-a) I),
and the optimal noise predictor is E[eps | z] = sum_m P(m | z) eps_m(z), eps_m the (linear) optimal
predictor of component m. One component is the Gaussian case.
"""
import math

import torch as t

import utils


class GaussianMixture(t.nn.Module):
    """p = sum_m weights[m] N(means[m], covs[m]); a module whose forward is the optimal eps_hat(z, a)."""

    def __init__(self, weights, means, covs):
        super().__init__()
        weights = t.as_tensor(weights, dtype=t.float64)
        means = t.as_tensor(means, dtype=t.float64)
        covs = t.as_tensor(covs, dtype=t.float64)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.components = t.nn.ModuleList()
        for mean, cov in zip(means, covs):
            ref = utils.GaussianReference(mean.numel()).double()
            eigvals, eigvecs = t.linalg.eigh(cov)
            ref.mean, ref.eigvals, ref.eigvecs = mean.flatten(), eigvals, eigvecs
            self.components.append(ref)
        self.x_shape = tuple(means.shape[1:])

    def _log_marginals(self, z, logsnr):
        """log pi_m + log N(z; sqrt(s(a)) mu_m, s(a) Sigma_m + s(-a) I) for every component, (B, M)."""
        a = logsnr.to(z.dtype).view(-1, 1)
        out = []
        for lw, c in zip(self.log_weights, self.components):
            y = c._rotate(z.flatten(1) - t.sigmoid(a).sqrt() * c.mean.to(z.dtype))
            var = t.sigmoid(a) * c.eigvals.to(z.dtype) + t.sigmoid(-a)
            out.append(lw - 0.5 * (y ** 2 / var + var.log() + math.log(2 * math.pi)).sum(1))
        return t.stack(out, 1)

    def forward(self, z, logsnr):
        resp = self._log_marginals(z, logsnr).softmax(1)
        eps = t.stack([c.eps(z, logsnr).flatten(1) for c in self.components], 1)
        return (resp.unsqueeze(-1) * eps).sum(1).view_as(z)

    def nll(self, x):
        """Exact -log p(x): the marginal at a -> +inf."""
        parts = [lw - c.nll(x) for lw, c in zip(self.log_weights, self.components)]
        return -t.logsumexp(t.stack(parts, 1), 1)

    def sample(self, n, generator=None):
        m = t.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        draws = t.stack([c.sample(n, generator=generator) for c in self.components], 1)
        return draws[t.arange(n), m].view((n,) + self.x_shape)


def mixture_2d():
    """The 2-D test mixture: three components, one nearly degenerate, with unequal weights."""
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-1.0, 0.5], [1.2, 0.8], [0.3, -1.3]],
        covs=[[[0.30, 0.20], [0.20, 0.25]],
              [[0.05, -0.02], [-0.02, 0.40]],
              [[0.60, 0.00], [0.00, 0.01]]])


def ring_2d(components=8, radius=1.3, var=0.02):
    """Equal-weight Gaussians N(radius (cos, sin)(2 pi m / M), var I) on a ring: a sharper, more
    multimodal 2-D test case than mixture_2d."""
    angles = t.arange(components, dtype=t.float64) * 2 * math.pi / components
    means = radius * t.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(t.ones(components), means, var * t.eye(2, dtype=t.float64).expand(
        components, 2, 2))


def gaussian(mean, cov):
    """A single Gaussian N(mean, cov) (mean of any sample shape, cov over the flattened mean)."""
    mean = t.as_tensor(mean, dtype=t.float64)
    return GaussianMixture([1.0], mean.unsqueeze(0), t.as_tensor(cov, dtype=t.float64).unsqueeze(0))


def reference_nll(mixture, x):
    """-log p(x) computed by torch.distributions, independently of GaussianReference."""
    comps = t.distributions.MultivariateNormal(
        t.stack([c.mean for c in mixture.components]),
        t.stack([c.eigvecs @ t.diag(c.eigvals) @ c.eigvecs.T for c in mixture.components]))
    p = t.distributions.MixtureSameFamily(t.distributions.Categorical(logits=mixture.log_weights),
                                          comps)
    return -p.log_prob(x.flatten(1).to(t.float64))
