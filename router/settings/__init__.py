"""The tables of the configuration file, one module per concern; :mod:`router.config` assembles them.

Import the public names from :mod:`router.config`, which re-exports them.
"""
