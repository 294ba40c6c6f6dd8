"""Engines behind the worker contract: the protocol and registry are in `engines.base`."""
