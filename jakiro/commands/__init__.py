"""The ``jakiro`` commands, one module each (``add_parser``, ``validate``, ``run``), with the options
and loaders they share in :mod:`jakiro.commands.options`, the offline prompt sets in
:mod:`jakiro.commands.prompts` and side-by-side runs in :mod:`jakiro.commands.evaluate`.

The commands use the engine (``jakiro.generate``, ``jakiro.draft``, ...); the engine never
imports them.
"""
