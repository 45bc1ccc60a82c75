"""sqapi's built-in plugins, one folder each; installed as the package ``sqapi.builtin_plugins``.

This file only makes the folder a package for the wheel: a ``plugins/`` folder of your own needs none.
"""
