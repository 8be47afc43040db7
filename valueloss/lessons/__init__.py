"""Demos written for particular notebooks: the data-parallel replay (04) and the aggregation pictures.

Needs the ``[notebooks]`` extra (matplotlib, ipywidgets). Nothing in the core imports this package.
"""
