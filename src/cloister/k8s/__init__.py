"""Kubernetes integration: CRDs (package data in ``crds/``), manifest rewriting (``sconify``).

The operator and the admission webhook live beside these modules. Kubernetes only places
things: nothing here holds a secret or decides on one.
"""
