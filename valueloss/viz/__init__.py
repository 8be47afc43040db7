"""Pictures and slider explorers of the value loss: matplotlib figures (``ax`` in, ``Axes`` out), the
explorers built on them, the Voilà dashboard and the batch upload.

Needs the ``[notebooks]`` extra (matplotlib, ipywidgets, anywidget). Nothing in the core imports this package.
"""
