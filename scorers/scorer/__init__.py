"""The built-in scorers, one module each (registered by name in ``scorers.registry``)."""
