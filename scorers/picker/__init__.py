"""The built-in pickers, one module each (registered by name in ``scorers.registry``)."""
