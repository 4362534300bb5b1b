"""SoKD inside other training frameworks. Each submodule imports its framework lazily, so
`import sokd` never needs them:

- `sokd.integrations.torchdistill`: a student wrapper and a loss registered with torchdistill
  (needs `pip install torchdistill`); importing the module registers them.
- `sokd.integrations.mdistiller`: a `Distiller` in the style of mdistiller's distillers,
  returning `(logits, losses)`; no dependency.

docs/integrations.md shows both in use.
"""
