"""Pictures of a run: the towers' conv1 kernels (the paper's Figure 3), learning curves, 10-crop examples.

``python -m distalex.report`` (``cli.py``) reads any model source (``distalex.model_source``: a
checkpoint, an exported model, an MLflow model or run) and draws what it allows: ``kernels.py``
(also used by the training loop each epoch), ``curves.py`` and ``ten_crop.py``, each on a plain
Agg canvas (``canvas.py``).
"""


class ReportError(ValueError):
    """A source the report cannot use; the message names it and what is wrong."""
