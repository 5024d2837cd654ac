"""Base editors, one folder each (``odedit_hf/editors/<name>/``), split like peft's tuners.

Every folder holds ``config.py`` (the PEFT config), ``layer.py`` (the adapter layer), ``model.py``
(the tuner), ``method.py`` (the :class:`~odedit_hf.editing.Editor`: hyperparameters, hooks) and an
``__init__.py`` that registers its PEFT type and exports ``METHOD``. Nothing here lists them: they
are discovered (:func:`odedit_hf.editing.available_methods`). The contract is in
``docs/ARCHITECTURE.md`` and ``CONTRIBUTING.md``.
"""
