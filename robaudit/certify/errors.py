"""The one exception of the certificate library."""

from __future__ import annotations


class CertificateUnavailable(Exception):
    """No sound certificate can be computed for this model; the message names the layer.

    Raised instead of ever returning a guessed number: a layer the bound propagation does
    not know, a graph that cannot be traced, or outputs that are not logits.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"certificate unavailable: {what}")
        self.what = what
