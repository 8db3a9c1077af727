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
            y = c.rotate(z.flatten(1) - t.sigmoid(a).sqrt() * c.mean.to(z.dtype))
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


class LabelledMixture(GaussianMixture):
    """A Gaussian mixture labelled by component: the optimal conditional denoiser
    eps_hat(z, a, y) = component y's eps (y = -1 or None: the mixture's), and in closed form
    -log p(x | y), log p(y) and the posterior log p(y | x)."""

    def forward(self, z, logsnr, y=None):
        mixed = super().forward(z, logsnr)
        if y is None:
            return mixed
        eps = t.stack([c.eps(z, logsnr).flatten(1) for c in self.components], 1)
        given = eps[t.arange(len(z)), y.clamp(min=0)].view_as(z)
        return t.where((y >= 0).view((-1,) + (1,) * (z.dim() - 1)), given, mixed)

    def nll_given(self, x, y):
        parts = t.stack([c.nll(x) for c in self.components], 1)
        return parts[t.arange(len(x)), y]

    def log_posterior(self, x):
        joint = t.stack([lw - c.nll(x) for lw, c in zip(self.log_weights, self.components)], 1)
        return joint - joint.logsumexp(1, keepdim=True)

    def sample_labelled(self, n, generator=None):
        y = t.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        draws = t.stack([c.sample(n, generator=generator) for c in self.components], 1)
        return draws[t.arange(n), y].view((n,) + self.x_shape), y


class GroupedMixture(GaussianMixture):
    """A Gaussian mixture whose labels group components (groups[m]: component m's label), so a
    class is itself a mixture, not a Gaussian: the optimal conditional denoiser is the mixture of
    the label's components (y = -1 or None: of all), and -log p(x | y) is in closed form."""

    def __init__(self, weights, means, covs, groups):
        super().__init__(weights, means, covs)
        self.register_buffer("groups", t.as_tensor(groups, dtype=t.long))
        self.num_classes = int(self.groups.max()) + 1

    def _given(self, z, logsnr, y):
        """log pi_m + log N_m at (z, a), -inf for components outside each sample's label."""
        logits = self._log_marginals(z, logsnr)
        return logits.masked_fill((y.view(-1, 1) >= 0) & (self.groups != y.view(-1, 1)),
                                  float("-inf"))

    def forward(self, z, logsnr, y=None):
        y = t.full((len(z),), -1, device=z.device) if y is None else y
        resp = self._given(z, logsnr, y).softmax(1)
        eps = t.stack([c.eps(z, logsnr).flatten(1) for c in self.components], 1)
        return (resp.unsqueeze(-1) * eps).sum(1).view_as(z)

    def nll_given(self, x, y):
        parts = t.stack([lw - c.nll(x) for lw, c in zip(self.log_weights, self.components)], 1)
        parts = parts.masked_fill(self.groups != y.view(-1, 1), float("-inf"))
        return -(parts.logsumexp(1) - self.log_prior()[y])

    def log_prior(self):
        return t.stack([self.log_weights[self.groups == k].logsumexp(0)
                        for k in range(self.num_classes)])

    def sample_labelled(self, n, generator=None):
        m = t.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        draws = t.stack([c.sample(n, generator=generator) for c in self.components], 1)
        return draws[t.arange(n), m].view((n,) + self.x_shape), self.groups[m]


def far_classes_2d():
    """Two labels at class means about -+2 (the data mean near -0.4), each a non-Gaussian pair of
    components: where the unconditional reference below the integration range misleads
    -log p(x | y) by about 1/2 e^(a_min) |m_y - m|^2 (docs/conditional.md)."""
    return GroupedMixture([0.35, 0.25, 0.15, 0.25],
                          [[-2.5, 0.4], [-1.5, -0.4], [1.4, 0.5], [2.6, -0.3]],
                          [[[0.10, 0.03], [0.03, 0.08]], [[0.06, 0.0], [0.0, 0.15]],
                           [[0.12, -0.04], [-0.04, 0.07]], [[0.05, 0.0], [0.0, 0.05]]],
                          [0, 0, 1, 1])


def mixture_2d(cls=GaussianMixture):
    """The 2-D test mixture: three components, one nearly degenerate, with unequal weights (cls:
    LabelledMixture for its components as labels)."""
    return cls(
        weights=[0.5, 0.3, 0.2],
        means=[[-1.0, 0.5], [1.2, 0.8], [0.3, -1.3]],
        covs=[[[0.30, 0.20], [0.20, 0.25]],
              [[0.05, -0.02], [-0.02, 0.40]],
              [[0.60, 0.00], [0.00, 0.01]]])


def overlapping_2d():
    """Three overlapping Gaussians labelled by component (LabelledMixture): p(y | x) and
    i(x; y) vary from point to point."""
    return LabelledMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-0.5, 0.0], [0.5, 0.1], [0.0, 0.7]],
        covs=[[[0.30, 0.05], [0.05, 0.20]], [[0.20, 0.0], [0.0, 0.30]],
              [[0.15, 0.0], [0.0, 0.10]]])


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


class DiscreteAtoms(t.nn.Module):
    """P = sum_m probs[m] delta(x - atoms[m]) on a few points of R^d; forward is the optimal eps_hat.

    Given z, the posterior over atoms is P(m | z) = softmax_m(log pi_m - ||z - sqrt(s(a)) x_m||^2 /
    (2 s(-a))), so x_hat = sum_m P(m | z) x_m and eps_hat = (z - sqrt(s(a)) x_hat) / sqrt(s(-a)), all
    closed form; -log P(x_m) = -log pi_m exactly.
    """

    def __init__(self, atoms, probs, x_shape=None):
        super().__init__()
        atoms = t.as_tensor(atoms, dtype=t.float64)
        atoms = atoms.view(len(atoms), -1)
        probs = t.as_tensor(probs, dtype=t.float64)
        self.register_buffer("atoms", atoms)
        self.register_buffer("log_probs", (probs / probs.sum()).log())
        self.x_shape = tuple(x_shape or atoms.shape[1:])

    def posterior(self, z, logsnr):
        """log P(m | z), (B, M)."""
        a = logsnr.to(z.dtype).view(-1, 1, 1)
        diff = z.flatten(1).unsqueeze(1) - t.sigmoid(a).sqrt() * self.atoms.to(z.dtype)
        logits = self.log_probs.to(z.dtype) - diff.pow(2).sum(-1) / (2 * t.sigmoid(-a[:, :, 0]))
        return logits.log_softmax(1)

    def forward(self, z, logsnr):
        x_hat = self.posterior(z, logsnr).exp() @ self.atoms.to(z.dtype)
        a = logsnr.to(z.dtype).view(-1, 1)
        eps = (z.flatten(1) - t.sigmoid(a).sqrt() * x_hat) / t.sigmoid(-a).sqrt()
        return eps.view_as(z)

    def atom_index(self, x):
        """Which atom each sample is (ValueError if one is not an atom)."""
        dist = (x.flatten(1).to(t.float64).unsqueeze(1) - self.atoms).abs().amax(-1)
        best = dist.min(1)
        if (best.values > 1e-9).any():
            raise ValueError("a sample is not one of the atoms")
        return best.indices

    def nll(self, x):
        """Exact -log P(x) = -log pi_m."""
        return -self.log_probs[self.atom_index(x)]

    def entropy(self):
        return -(self.log_probs.exp() * self.log_probs).sum()

    def sample(self, n, generator=None):
        m = t.multinomial(self.log_probs.exp(), n, replacement=True, generator=generator)
        return self.atoms[m].view((n,) + self.x_shape)

    def support(self):
        """All atoms, (M, *x_shape), with their probabilities."""
        return self.atoms.view((-1,) + self.x_shape), self.log_probs.exp()


class ProductDiscrete(t.nn.Module):
    """Independent coordinates, coordinate i distributed as the 1-D DiscreteAtoms factors[i]. The
    channel acts per coordinate, so the optimal eps_hat is the factors' eps_hat side by side and
    -log P(x) is the sum of the factors'."""

    def __init__(self, factors):
        super().__init__()
        self.factors = t.nn.ModuleList(factors)
        self.x_shape = (len(self.factors),)

    def forward(self, z, logsnr):
        return t.cat([f(z[:, i:i + 1], logsnr) for i, f in enumerate(self.factors)], 1)

    def nll(self, x):
        return sum(f.nll(x[:, i:i + 1]) for i, f in enumerate(self.factors))

    def sample(self, n, generator=None):
        return t.cat([f.sample(n, generator) for f in self.factors], 1)


def discretised_gaussian(mean, std, delta, lo=-1., width=8.):
    """N(mean, std^2) binned on the grid lo + k * delta: atom k has the mass of its bin
    [g_k - delta/2, g_k + delta/2), for the grid values within mean +- width * std (the mass
    outside is below 1e-15 at width 8, and the masses are renormalised)."""
    k_lo = math.floor((mean - width * std - lo) / delta)
    k_hi = math.ceil((mean + width * std - lo) / delta)
    grid = lo + delta * t.arange(k_lo, k_hi + 1, dtype=t.float64)
    normal = t.distributions.Normal(t.tensor(mean, dtype=t.float64), t.tensor(std, dtype=t.float64))
    mass = normal.cdf(grid + delta / 2) - normal.cdf(grid - delta / 2)
    return DiscreteAtoms(grid.view(-1, 1), mass)


class Zero(t.nn.Module):
    """eps_hat = 0: the optimal predictor of nothing, a valid (bad) denoiser."""

    def forward(self, z, logsnr):
        return t.zeros_like(z)


class Recorder(t.nn.Module):
    """Passes through to a denoiser and keeps the (z, logsnr) it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, z, logsnr):
        self.calls.append((z.detach().clone(), logsnr.detach().clone()))
        return self.inner(z, logsnr)
