"""masqd's own backends and event sources, registered through the same hooks as any plugin.

Each module here is registered (under its module name) before the entry-point plugins; block one
with ``--disable-plugin masqd.default_plugins.sources`` like any other plugin.
"""
