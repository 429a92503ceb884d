"""Certified L2 robustness radii (Hein & Andriushchenko's cross-Lipschitz bound, made sound for deep nets).

    from robaudit.certify import certify_l2, CertificateUnavailable
    cert = certify_l2(model, x, y, budget="default")   # cert.radius (N,), cert.method

Modules: `graph` (model -> primitive float64 ops), `interval` (Fast-Lip style local
bound), `closed_form` (one hidden layer), `global_lipschitz` (spectral-norm fallback),
`radius` (ball search with shells), `budget` (cost presets), `certificate` (the API).
"""

from __future__ import annotations

from robaudit.certify.budget import BUDGETS, Budget
from robaudit.certify.certificate import METHODS, Certificate, certify_l2
from robaudit.certify.errors import CertificateUnavailable

__all__ = ["BUDGETS", "METHODS", "Budget", "Certificate", "CertificateUnavailable", "certify_l2"]
