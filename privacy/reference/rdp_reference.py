#!/usr/bin/env python3
"""Reference epsilons for fedquic-privacy's RDP accountant (privacy/src/dp/accountant.rs).

Run with exactly these packages (the versions the committed CSV was made with):

    python3 -m venv /tmp/dpref
    /tmp/dpref/bin/pip install dp-accounting==0.6.0 numpy==2.4.6 scipy==1.17.1
    /tmp/dpref/bin/python privacy/reference/rdp_reference.py > privacy/tests/data/rdp_reference.csv

dp-accounting is Google's accountant (the one TF Privacy uses). Poisson rows compose
`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` under ADD_OR_REMOVE_ONE; fixed-size rows
compose `SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(sigma / 2))` under REPLACE_ONE
(the only relation dp-accounting allows for it; sigma / 2 because the replace-one sensitivity
of a sum of updates clipped to C is 2C). The `noise_multiplier` column is fedquic's sigma
(noise std / clip norm) in both cases. Epsilon comes from
`RdpAccountant.get_epsilon_and_optimal_order`, i.e. `compute_epsilon` (Canonne, Kamath,
Steinke 2020, Prop. 12 / Asoodeh et al. 2020). The orders are passed explicitly and are the
Rust default: Opacus's DEFAULT_ALPHAS.
"""

import sys
from importlib.metadata import version

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

PINNED = {"dp-accounting": "0.6.0", "numpy": "2.4.6", "scipy": "1.17.1"}

# Opacus DEFAULT_ALPHAS, identical to fedquic_privacy::dp::DEFAULT_ORDERS.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# (population n, clients per round m, sigma, steps, delta); q = m / n.
POINTS = [
    (1000, 1, 1.0, 1000, 1e-5),  # q = 0.001
    (1000, 1, 0.5, 10000, 1e-7),
    (1000, 10, 1.1, 10000, 1e-5),  # q = 0.01
    (1000, 10, 0.8, 100, 1e-3),
    (1000, 10, 4.0, 1, 1e-5),
    (200, 10, 1.0, 100, 1e-5),  # q = 0.05
    (200, 10, 2.0, 1000, 1e-6),
    (100, 10, 1.5, 500, 1e-5),  # q = 0.1
    (100, 10, 0.7, 50, 1e-4),
    (100, 10, 10.0, 10000, 1e-7),
    (100, 30, 1.0, 200, 1e-5),  # q = 0.3
    (100, 30, 5.0, 3000, 1e-3),
    (10, 5, 2.0, 100, 1e-5),  # q = 0.5
    (10, 5, 0.6, 10, 1e-6),
    (50, 50, 1.0, 1, 1e-5),  # q = 1
    (50, 50, 3.0, 100, 1e-7),
    (50, 50, 10.0, 10000, 1e-3),
]


def poisson(n, m, sigma, steps, delta):
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(dp_event.PoissonSampledDpEvent(m / n, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon_and_optimal_order(delta)


def without_replacement(n, m, sigma, steps, delta):
    acc = rdp.RdpAccountant(
        orders=ORDERS,
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
    )
    # Replace-one neighbours: swapping one client's update for another's moves a sum of
    # updates clipped to C by up to 2C, so the noise multiplier relative to that
    # sensitivity is sigma / 2 (fedquic's sigma is noise std / C). The Rust accountant
    # does the same halving inside `RdpAccountant::step`.
    event = dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma / 2))
    acc.compose(event, steps)
    return acc.get_epsilon_and_optimal_order(delta)


def main():
    for pkg, want in PINNED.items():
        have = version(pkg)
        if have != want:
            sys.exit(f"{pkg} {have} installed, the reference pins {want}")
    print("sampling,population,clients_per_round,q,noise_multiplier,steps,delta,epsilon,order")
    for name, fn in (("poisson", poisson), ("fixed_size_without_replacement", without_replacement)):
        for n, m, sigma, steps, delta in POINTS:
            eps, order = fn(n, m, sigma, steps, delta)
            print(f"{name},{n},{m},{m / n!r},{sigma!r},{steps},{delta!r},{float(eps)!r},{float(order)!r}")


if __name__ == "__main__":
    main()
