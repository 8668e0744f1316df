"""The built-in filters, one module each (registered by name in ``scorers.registry``)."""
