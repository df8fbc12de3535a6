"""Shipped weights, installed as the package data ``namm_transfer.weights``; find them with
:func:`namm_transfer.shipped.shipped_weights`."""
