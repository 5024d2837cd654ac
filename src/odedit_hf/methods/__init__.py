"""Wrapper methods, one folder each (``odedit_hf/methods/<name>/``): ODEdit (and, as they land, LDKE
and ASAM). A wrapper method wraps a base editor (``--method odedit+lora``): the editor decides which
parameters an edit trains and how they act; the wrapper decides the objective. They share the generic
wrapper tuner and the environment batches of :mod:`odedit_hf.editing`. Discovered, not listed here.
"""
