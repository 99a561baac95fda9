"""Model zoo: plain ``nn.Module``s whose features are reached by taps.

Import :mod:`smskd.models.registry` for ``MODELS`` / ``build_model``; this package
init stays empty so that the registry can import the model modules.
"""
